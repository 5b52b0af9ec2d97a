"""GET /metrics: Prometheus text exposition (open, like health, when API keys are set)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse

from api.deps import CatalogDep, RedisDep
from api.metrics import exposition

router = APIRouter()


@router.get("/metrics", response_class=PlainTextResponse, include_in_schema=False)
async def metrics(client: RedisDep, catalog: CatalogDep) -> PlainTextResponse:
    return PlainTextResponse(await exposition(client, catalog), media_type="text/plain; version=0.0.4")
