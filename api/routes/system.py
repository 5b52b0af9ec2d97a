"""GET /v1/system/health: is the queue reachable, and which workers and models are live."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from api.deps import RedisDep
from queueing import registry

router = APIRouter()


@router.get("/v1/system/health")
async def health(client: RedisDep, request: Request) -> JSONResponse:
    try:
        if request.app.state.breaker.open:
            # Known not to answer (api/redis_breaker.py): no need to wait for this PING to time out too.
            raise redis.TimeoutError("Redis did not answer the last command in time")
        await client.ping()
        workers = await registry.live_workers(client)
    except redis.RedisError as exc:
        body = {"status": "unavailable", "redis": False, "error": str(exc), "workers": [], "models": []}
        return JSONResponse(body, status_code=503)
    models = sorted({m for w in workers for m in w.models})
    body = {
        "status": "ok" if workers else "no_workers",
        "redis": True,
        "workers": [w.name for w in workers],
        "models": models,
    }
    return JSONResponse(body)
