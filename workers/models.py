"""The model manager: which models this worker process has loaded, loads and unloads at run time, a memory
budget with LRU eviction of idle models, pinning, and unloading after an idle keep-alive.

It knows nothing of Celery: the runtime tells it what to load and listens (``on_change``) to start or stop
consuming queues and to advertise the new state at once.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from engines.base import Engine
from engines.platform import choose_engine
from engines.registry import create_engine
from queueing.catalog import Catalog, ModelSpec
from queueing.registry import LoadFailure, ModelState, ModelStatus

logger = logging.getLogger(__name__)


class ModelNotLoaded(LookupError):
    pass


class CannotLoad(RuntimeError):
    """The model is unknown to this worker's engine, its weights are missing, or the budget is full of
    models that are pinned or busy."""


@dataclass
class _Slot:
    engine_name: str
    state: ModelState
    pinned: bool
    keep_alive: float | None
    bytes: int
    engine: Engine | None = None
    in_use: int = 0
    last_used: float = field(default_factory=time.time)
    ready: threading.Event = field(default_factory=threading.Event)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class ModelManager:
    def __init__(
        self,
        catalog: Catalog,
        forced_engine: str | None = None,
        n_threads: int | None = None,
        *,
        max_models: int = 0,
        memory_budget: int = 0,
        default_keep_alive: float | None = None,
        llamacpp_cache_mib: int | None = None,
    ) -> None:
        self._catalog = catalog
        self._forced_engine = forced_engine
        self._n_threads = n_threads
        # None: the engine's own default.
        self._llamacpp_cache_mib = llamacpp_cache_mib
        self.max_models = max_models
        self.memory_budget = memory_budget
        self._default_keep_alive = default_keep_alive
        self._slots: dict[str, _Slot] = {}
        self._lock = threading.Lock()
        self.load_errors: dict[str, LoadFailure] = {}
        # Called with (model, new state or None when gone) after every change, outside the lock.
        self.on_change: Callable[[str, ModelState | None], None] = lambda model, state: None

    # -- what this worker can do ------------------------------------------------------------------------

    def engine_for(self, spec: ModelSpec) -> str:
        if self._forced_engine:
            if self._forced_engine not in spec.sources:
                raise CannotLoad(f"model {spec.id!r} has no source for engine {self._forced_engine!r}")
            return self._forced_engine
        return choose_engine(spec.engines(), spec.engine)

    def _locate(self, model: str) -> tuple[ModelSpec, str, Path]:
        spec = self._catalog.get(model)
        if spec is None:
            raise CannotLoad(f"model {model!r} is not in the catalog")
        name = self.engine_for(spec)
        try:
            path = spec.sources[name].resolve()
        except FileNotFoundError as exc:
            raise CannotLoad(f"model {model!r} for {name}: {exc}") from exc
        if not path.exists():
            raise CannotLoad(f"model {model!r} for {name}: {path} does not exist")
        return spec, name, path

    def concurrency_for(self, models: list[str]) -> int:
        """Jobs to run at once for these models: the most any of their sources asks (vLLM batches many
        requests; llama.cpp serves one at a time)."""
        wanted = [1]
        for model in models:
            spec = self._catalog.get(model)
            if spec is not None:
                with contextlib.suppress(CannotLoad):
                    wanted.append(spec.sources[self.engine_for(spec)].max_concurrency)
        return max(wanted)

    def capable(self) -> list[str]:
        """Catalog models this worker could load (its engine has a source whose weights are here)."""
        found = []
        for model, spec in self._catalog.models.items():
            with contextlib.suppress(CannotLoad):
                if spec.sources[self.engine_for(spec)].available():
                    found.append(model)
        return found

    # -- load, unload, pin ------------------------------------------------------------------------------

    def adopt(self, model: str, engine: Engine, pinned: bool = True) -> None:
        """Serve an engine built elsewhere (tests) as ``model``."""
        slot = _Slot(engine.name, "ready", pinned, None, 0, engine=engine)
        slot.ready.set()
        with self._lock:
            self._slots[model] = slot

    def load(self, model: str, pinned: bool = False, keep_alive: float | None = None) -> Engine:
        """Load ``model`` (or wait for a load in progress); evicts idle models to stay within the budget."""
        with self._lock:
            slot = self._slots.get(model)
            if slot is None:
                slot = self._reserve(model, pinned, keep_alive)
                mine = True
            else:
                slot.pinned = slot.pinned or pinned
                mine = False
        if not mine:
            slot.ready.wait()
            return self.get(model)
        self.on_change(model, "loading")
        try:
            spec, name, path = self._locate(model)
            started = time.perf_counter()
            source = spec.sources[name]
            options = dict(getattr(source, "options", {}))
            if name == "llamacpp" and self._llamacpp_cache_mib is not None:
                options.setdefault("cache_mib", self._llamacpp_cache_mib)  # the catalog's own option wins
            engine = create_engine(
                name, model_path=path, n_ctx=spec.context_length, n_threads=self._n_threads, **options
            )
            logger.info(
                "loaded %s with %s from %s in %.2fs", model, name, path, time.perf_counter() - started
            )
        except Exception as exc:
            with self._lock:
                del self._slots[model]
                self.load_errors[model] = LoadFailure(message=str(exc))
            slot.ready.set()
            self.on_change(model, None)
            raise
        with self._lock:
            slot.engine, slot.state, slot.last_used = engine, "ready", time.time()
            self.load_errors.pop(model, None)
        slot.ready.set()
        self.on_change(model, "ready")
        return engine

    def _reserve(self, model: str, pinned: bool, keep_alive: float | None) -> _Slot:
        """Under the lock: make room within the budget and hold a slot in state loading."""
        spec, name, path = self._locate(model)
        size = _size(path)
        victims = self._evictable_lru()
        evict: list[str] = []
        while not self._fits(size, exclude=evict):
            if not victims:
                raise CannotLoad(
                    f"cannot load {model!r}: the model budget is full of pinned or busy models "
                    f"({', '.join(self._slots) or 'none'})"
                )
            evict.append(victims.pop(0))
        for victim in evict:
            logger.info("evicting idle model %s to load %s", victim, model)
            self._slots[victim].state = "unloading"
            threading.Thread(target=self._finish_unload, args=(victim,), daemon=True).start()
        ka = keep_alive if keep_alive is not None else spec.keep_alive
        ka = ka if ka is not None else self._default_keep_alive
        slot = _Slot(name, "loading", pinned, None if ka is None or ka < 0 else ka, size)
        self._slots[model] = slot
        return slot

    def _fits(self, size: int, exclude: list[str]) -> bool:
        held = [s for m, s in self._slots.items() if m not in exclude]
        if self.max_models and len(held) + 1 > self.max_models:
            return False
        return not self.memory_budget or sum(s.bytes for s in held) + size <= self.memory_budget

    def _evictable_lru(self) -> list[str]:
        idle = [(s.last_used, m) for m, s in self._slots.items() if s.state == "ready" and not s.pinned]
        return [m for _, m in sorted(idle) if self._slots[m].in_use == 0]

    def unload(self, model: str) -> bool:
        """Stop serving ``model`` and free it once its running jobs finished; False if it was not loaded."""
        with self._lock:
            slot = self._slots.get(model)
            if slot is None or slot.state != "ready":
                return False
            slot.state = "unloading"
        self._finish_unload(model)
        return True

    def _finish_unload(self, model: str) -> None:
        self.on_change(model, "unloading")
        while True:
            with self._lock:
                slot = self._slots[model]
                if slot.in_use == 0:
                    del self._slots[model]
                    break
            time.sleep(0.05)
        if slot.engine is not None:
            slot.engine.close()
        logger.info("unloaded %s", model)
        self.on_change(model, None)

    def pin(self, model: str, pinned: bool = True) -> bool:
        with self._lock:
            slot = self._slots.get(model)
            if slot is None:
                return False
            slot.pinned = pinned
        self.on_change(model, slot.state)
        return True

    def expire_idle(self, now: float | None = None) -> list[str]:
        """Unload every unpinned model idle for longer than its keep-alive."""
        now = time.time() if now is None else now
        with self._lock:
            expired = [
                m
                for m, s in self._slots.items()
                if s.state == "ready"
                and not s.pinned
                and s.in_use == 0
                and s.keep_alive is not None
                and now - s.last_used > s.keep_alive
            ]
        return [m for m in expired if self.unload(m)]

    # -- serving ----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def using(self, model: str) -> Iterator[None]:
        """Marks ``model`` busy for a job, so it is neither evicted nor unloaded under it."""
        with self._lock:
            slot = self._slots.get(model)
            if slot is not None:
                slot.in_use += 1
                slot.last_used = time.time()
        try:
            yield
        finally:
            if slot is not None:
                with self._lock:
                    slot.in_use -= 1
                    slot.last_used = time.time()

    def get(self, model: str) -> Engine:
        slot = self._slots.get(model)
        if slot is None or slot.state != "ready" or slot.engine is None:
            raise ModelNotLoaded(f"model {model!r} is not loaded on this worker")
        return slot.engine

    def loaded(self) -> list[str]:
        with self._lock:
            return [m for m, s in self._slots.items() if s.state == "ready"]

    def statuses(self) -> dict[str, ModelStatus]:
        with self._lock:
            return {
                m: ModelStatus(
                    state=s.state,
                    engine=s.engine_name,
                    pinned=s.pinned,
                    bytes=s.bytes,
                    last_used=s.last_used,
                    keep_alive=s.keep_alive,
                )
                for m, s in self._slots.items()
            }

    def engine_names(self) -> list[str]:
        with self._lock:
            return sorted({s.engine_name for s in self._slots.values()})

    def close(self) -> None:
        with self._lock:
            slots = list(self._slots.values())
            self._slots.clear()
        for slot in slots:
            if slot.engine is not None:
                slot.engine.close()
