"""The model manager: which engines this worker process has loaded, by catalog model id."""

from __future__ import annotations

import logging
import time

from engines.base import Engine
from engines.platform import choose_engine
from engines.registry import create_engine
from queueing.catalog import Catalog, ModelSpec

logger = logging.getLogger(__name__)


class ModelNotLoaded(LookupError):
    pass


class ModelManager:
    def __init__(
        self, catalog: Catalog, forced_engine: str | None = None, n_threads: int | None = None
    ) -> None:
        self._catalog = catalog
        self._forced_engine = forced_engine
        self._n_threads = n_threads
        self._engines: dict[str, Engine] = {}

    def engine_for(self, spec: ModelSpec) -> str:
        if self._forced_engine:
            if self._forced_engine not in spec.sources:
                raise ValueError(f"model {spec.id!r} has no source for engine {self._forced_engine!r}")
            return self._forced_engine
        return choose_engine(spec.engines())

    def load(self, model: str) -> Engine:
        if model in self._engines:
            return self._engines[model]
        spec = self._catalog.get(model)
        if spec is None:
            raise ModelNotLoaded(f"model {model!r} is not in the catalog")
        name = self.engine_for(spec)
        path = spec.sources[name].resolve()
        started = time.perf_counter()
        engine = create_engine(name, model_path=path, n_ctx=spec.context_length, n_threads=self._n_threads)
        logger.info("loaded %s with %s from %s in %.2fs", model, name, path, time.perf_counter() - started)
        self._engines[model] = engine
        return engine

    def get(self, model: str) -> Engine:
        try:
            return self._engines[model]
        except KeyError:
            raise ModelNotLoaded(f"model {model!r} is not loaded on this worker") from None

    def loaded(self) -> list[str]:
        return list(self._engines)

    def engine_names(self) -> list[str]:
        return sorted({e.name for e in self._engines.values()})

    def close(self) -> None:
        for engine in self._engines.values():
            engine.close()
        self._engines.clear()
