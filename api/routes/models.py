"""GET /v1/models and /v1/models/{id}: the catalog models that live workers serve right now."""

from __future__ import annotations

from fastapi import APIRouter

from api import errors
from api.deps import CatalogDep, RedisDep
from api.protocol.models import ModelCard, ModelList
from queueing import registry
from queueing.catalog import Catalog
from queueing.registry import WorkerInfo

router = APIRouter()


def served_models(workers: list[WorkerInfo], catalog: Catalog) -> list[ModelCard]:
    cards: dict[str, ModelCard] = {}
    for w in workers:
        for model in w.models:
            spec = catalog.get(model)
            card = cards.setdefault(
                model,
                ModelCard(
                    id=model,
                    created=int(w.started_at),
                    engine="",
                    workers=[],
                    context_length=spec.context_length if spec else None,
                ),
            )
            card.workers.append(w.name)
            card.created = min(card.created, int(w.started_at))
            engines = set(filter(None, card.engine.split(","))) | set(w.engine.split(","))
            card.engine = ",".join(sorted(engines))
    return sorted(cards.values(), key=lambda c: c.id)


@router.get("/v1/models", response_model=ModelList)
async def list_models(client: RedisDep, catalog: CatalogDep) -> ModelList:
    return ModelList(data=served_models(await registry.live_workers(client), catalog))


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, client: RedisDep, catalog: CatalogDep) -> ModelCard:
    for card in served_models(await registry.live_workers(client), catalog):
        if card.id == model_id:
            return card
    raise errors.model_not_found(model_id)
