"""The fleet's control plane seen from the API: which fresh workers serve a model, loading a model on
demand or by request, unloading and pinning (Celery remote-control broadcasts to one worker each)."""

from __future__ import annotations

import asyncio
import logging
import time

import redis.asyncio as aredis
from celery import Celery

from api import errors
from queueing import keys, registry
from queueing.registry import WorkerInfo

logger = logging.getLogger(__name__)


class FleetControl:
    def __init__(
        self,
        client: aredis.Redis,
        celery: Celery,
        fresh_seconds: float,
        load_timeout: float,
        poll: float,
    ) -> None:
        self._r = client
        self._celery = celery
        self.fresh_seconds = fresh_seconds
        self.load_timeout = load_timeout
        self._poll = poll

    async def workers(self) -> list[WorkerInfo]:
        """Workers fresh enough to be given work."""
        return await registry.fresh_workers(self._r, self.fresh_seconds)

    async def ready(self, model: str) -> list[WorkerInfo]:
        return [w for w in await self.workers() if model in w.models]

    async def find(self, name: str) -> WorkerInfo:
        for w in await self.workers():
            if w.name == name:
                return w
        raise errors.worker_not_found(name)

    async def _send(self, worker: WorkerInfo, command: str, **arguments: object) -> None:
        # kombu's producer is synchronous; a broadcast is one PUBLISH, but off the event loop all the same.
        await asyncio.to_thread(
            self._celery.control.broadcast,
            command,
            arguments=arguments,
            destination=[worker.node],
            reply=False,
        )

    # -- load / unload / pin ----------------------------------------------------------------------------

    @staticmethod
    def choose_loader(workers: list[WorkerInfo], model: str) -> WorkerInfo | None:
        """The capable worker that can best take one more model: fewest models, then least busy."""
        able = [w for w in workers if model in w.capable and model not in w.model_states]
        return min(able, key=lambda w: (len(w.model_states), w.in_flight, w.name), default=None)

    async def load(
        self, model: str, worker: str | None = None, pinned: bool = False, keep_alive: float | None = None
    ) -> WorkerInfo:
        workers = await self.workers()
        if worker is not None:
            target = await self.find(worker)
            if model not in target.capable:
                raise errors.invalid_request(
                    f"Worker `{worker}` cannot load `{model}` (its engine has no weights for it).",
                    "model",
                    "model_not_loadable",
                )
        else:
            # Every capable worker has it already: loading it again is a no-op there (a pin still applies),
            # as Ollama and vLLM answer a load of a loaded model, not a 503.
            holding = [w for w in workers if model in w.model_states]
            found = self.choose_loader(workers, model) or min(holding, key=lambda w: w.name, default=None)
            if found is None:
                raise errors.model_load_failed(model, "no live worker can load it")
            target = found
        await self._send(target, keys.CONTROL_LOAD, model=model, pinned=pinned, keep_alive=keep_alive)
        return target

    async def unload(self, model: str, worker: str | None = None) -> list[str]:
        targets = [await self.find(worker)] if worker else await self.workers()
        targets = [w for w in targets if model in w.model_states]
        for w in targets:
            await self._send(w, keys.CONTROL_UNLOAD, model=model)
        return [w.name for w in targets]

    async def pin(self, model: str, worker: str | None = None, pinned: bool = True) -> list[str]:
        targets = [await self.find(worker)] if worker else await self.workers()
        targets = [w for w in targets if model in w.model_states]
        for w in targets:
            await self._send(w, keys.CONTROL_PIN, model=model, pinned=pinned)
        return [w.name for w in targets]

    async def wait_ready(
        self, model: str, worker: str | None, limit: float, load_when_idle: bool = False
    ) -> list[WorkerInfo]:
        """Wait until ``model`` is ready (on ``worker`` if given); raises 503 if its load failed. With
        ``load_when_idle``, start a load whenever no worker has the model at all (not even loading or
        unloading), so a request that arrives during an unload is served after a fresh load."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        # A failure reported before this wait began belongs to an earlier attempt (a worker's clock may run a
        # little apart from this one's: a second of slack).
        since = time.time() - 1.0
        took = False
        try:
            while True:
                workers = [w for w in await self.workers() if worker in (None, w.name)]
                ready = [w for w in workers if model in w.models]
                if ready:
                    return ready
                busy = any(model in w.model_states for w in workers)
                failed = [f.message for w in workers if (f := w.load_errors.get(model)) and f.at >= since]
                if failed and not busy:
                    raise errors.model_load_failed(model, failed[0])
                if load_when_idle and not busy and not took:
                    took = await self._start_load(model)
                if loop.time() >= deadline:
                    raise errors.model_load_failed(model, f"not ready after {limit:g}s")
                await asyncio.sleep(self._poll)
        finally:
            if took:
                await self._r.delete(keys.load_lock_key(model))

    async def _start_load(self, model: str) -> bool:
        """Load ``model`` on the best capable worker unless another request already does; True if this one
        did (and holds the lock, one load per model at a time across every API process)."""
        lock = keys.load_lock_key(model)
        if not await self._r.set(lock, "1", nx=True, px=int(self.load_timeout * 1000)):
            return False
        try:
            target = await self.load(model)
        except BaseException:
            await self._r.delete(lock)
            raise
        logger.info("loading %s on demand on %s", model, target.name)
        return True

    async def ensure_ready(self, model: str) -> list[WorkerInfo] | None:
        """Workers ready for ``model``, loading it on demand when a capable worker has it not loaded.
        None when no live worker could ever serve it (the caller waits for one to start, then gives up)."""
        workers = await self.workers()
        ready = [w for w in workers if model in w.models]
        if ready:
            return ready
        if not any(model in w.model_states or model in w.capable for w in workers):
            return None
        return await self.wait_ready(model, None, self.load_timeout, load_when_idle=True)
