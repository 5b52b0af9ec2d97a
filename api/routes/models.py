"""GET /v1/models and /v1/models/{id}: the catalog models that live workers serve, are loading, or could load
on demand (listed as ``unloaded``: a request for one loads it)."""

from __future__ import annotations

from fastapi import APIRouter

from api import errors
from api.deps import CatalogDep, RedisDep
from api.keystore import requested_key
from api.protocol.models import ModelCard, ModelList
from queueing import registry
from queueing.catalog import Catalog
from queueing.registry import WorkerInfo

router = APIRouter()


def _card(model: str, workers: list[WorkerInfo], catalog: Catalog) -> ModelCard | None:
    ready = [w for w in workers if model in w.models]
    loading = [w for w in workers if model in w.model_states]
    capable = [w for w in workers if model in w.capable]
    if not (ready or loading or capable):
        return None
    spec = catalog.get(model)
    engines = {e for w in ready for e in w.engine.split(",") if e}
    return ModelCard(
        id=model,
        created=int(min((w.started_at for w in ready or loading or capable), default=0)),
        engine=",".join(sorted(engines)),
        workers=[w.name for w in ready],
        context_length=spec.context_length if spec else None,
        status="ready" if ready else "loading" if loading else "unloaded",
    )


def fleet_models(workers: list[WorkerInfo], catalog: Catalog) -> list[ModelCard]:
    names = sorted({*catalog.models, *(m for w in workers for m in w.models)})
    return [card for m in names if _allowed(m) and (card := _card(m, workers, catalog)) is not None]


def _allowed(model: str) -> bool:
    """Whether the request's key may call ``model`` (a managed key may be held to some)."""
    key = requested_key.get()
    return key is None or key.models is None or model in key.models


@router.get("/v1/models", response_model=ModelList)
async def list_models(client: RedisDep, catalog: CatalogDep) -> ModelList:
    return ModelList(data=fleet_models(await registry.live_workers(client), catalog))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, client: RedisDep, catalog: CatalogDep) -> ModelCard:
    card = _card(model_id, await registry.live_workers(client), catalog) if _allowed(model_id) else None
    if card is None:
        raise errors.model_not_found(model_id)
    return card
