"""The management API under /v1/system/: the fleet's workers, models per worker, queue depths, and model
load / unload / pin. Writes are broadcast to the workers; their effect shows in the registry."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import CatalogDep, DispatcherDep, RedisDep, model_spec
from api.protocol.fleet import (
    LoadRequest,
    ModelAction,
    ModelFleetList,
    ModelFleetView,
    ModelOnWorker,
    PinRequest,
    QueueDepth,
    QueueList,
    UnloadRequest,
    WorkerList,
    WorkerView,
)
from queueing import keys, registry

router = APIRouter(prefix="/v1/system", tags=["management"])


async def _depth(client: RedisDep, queue: str) -> int:
    async with client.pipeline(transaction=False) as pipe:
        for key in keys.queue_list_keys(queue):
            pipe.llen(key)
        return sum(await pipe.execute())


@router.get("/workers", response_model=WorkerList)
async def workers(client: RedisDep, dispatcher: DispatcherDep, stale: bool = False) -> WorkerList:
    """The workers routing may pick (beat within two heartbeat intervals); ``stale=true`` adds those that
    missed beats but are not declared dead yet (their jobs are taken back once their heartbeat expires)."""
    fresh = {w.name for w in await dispatcher.fleet.workers()}
    live = [w for w in await registry.live_workers(client) if stale or w.name in fresh]
    loads = await dispatcher.router.loads([w.name for w in live])
    data = []
    for w, load in zip(live, loads, strict=True):
        assigned = int(await client.scard(keys.worker_assigned_key(w.name)))
        view = WorkerView(
            **w.model_dump(),
            fresh=w.name in fresh,
            assigned=assigned,
            queue_depth=await _depth(client, keys.worker_queue(w.name)),
        )
        view.in_flight = max(view.in_flight, load)
        data.append(view)
    return WorkerList(data=data)


@router.get("/models", response_model=ModelFleetList)
async def models(client: RedisDep, catalog: CatalogDep, dispatcher: DispatcherDep) -> ModelFleetList:
    live = await dispatcher.fleet.workers()
    data = []
    for model in catalog.models:
        on = [
            ModelOnWorker(worker=w.name, **w.model_states[model].model_dump(exclude={"bytes"}))
            for w in live
            if model in w.model_states
        ]
        data.append(
            ModelFleetView(
                id=model,
                workers=on,
                capable=[w.name for w in live if model in w.capable],
                routing=dispatcher.routing_for(model),
                queue_depth=await _depth(client, keys.model_queue(model)),
            )
        )
    return ModelFleetList(data=data)


@router.get("/queues", response_model=QueueList)
async def queues(client: RedisDep, catalog: CatalogDep) -> QueueList:
    data = [
        QueueDepth(queue=q, kind="model", depth=await _depth(client, q))
        for q in map(keys.model_queue, catalog.models)
    ]
    for name in registry.known_names(await client.smembers(keys.WORKERS_SET)):
        q = keys.worker_queue(name)
        data.append(QueueDepth(queue=q, kind="worker", depth=await _depth(client, q)))
    return QueueList(data=data)


@router.post("/models/{model}/load", response_model=ModelAction, status_code=202)
async def load(model: str, body: LoadRequest, catalog: CatalogDep, dispatcher: DispatcherDep) -> ModelAction:
    model_spec(catalog, model)
    target = await dispatcher.fleet.load(model, body.worker, body.pinned, body.keep_alive)
    if body.wait:
        await dispatcher.fleet.wait_ready(model, target.name, dispatcher.fleet.load_timeout)
        return ModelAction(model=model, action="load", workers=[target.name], state="ready")
    return ModelAction(model=model, action="load", workers=[target.name], state="loading")


@router.post("/models/{model}/unload", response_model=ModelAction, status_code=202)
async def unload(
    model: str, body: UnloadRequest, catalog: CatalogDep, dispatcher: DispatcherDep
) -> ModelAction:
    model_spec(catalog, model)
    names = await dispatcher.fleet.unload(model, body.worker)
    return ModelAction(model=model, action="unload", workers=names, state="unloading" if names else None)


@router.post("/models/{model}/pin", response_model=ModelAction)
async def pin(model: str, body: PinRequest, catalog: CatalogDep, dispatcher: DispatcherDep) -> ModelAction:
    model_spec(catalog, model)
    names = await dispatcher.fleet.pin(model, body.worker, body.pinned)
    return ModelAction(model=model, action="pin" if body.pinned else "unpin", workers=names)
