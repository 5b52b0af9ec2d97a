"""The API process: ``create_app()`` and the lifespan that owns Redis, the pub/sub hub and the Celery
producer.

Nothing here imports an engine library: jobs are enqueued by task name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aredis
from fastapi import FastAPI

from api import errors
from api.jobs import Dispatcher, Limits
from api.routes import chat, models, system
from api.streams import StreamHub
from queueing.catalog import Catalog, get_catalog
from queueing.celery_app import create_celery
from queueing.settings import Settings, get_settings

logger = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> FastAPI:
    settings = settings or get_settings()
    catalog = catalog or get_catalog()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        client = aredis.Redis.from_url(settings.redis_url, socket_connect_timeout=2.0)
        hub = StreamHub(settings.redis_url)
        await hub.start()
        celery = create_celery(settings, catalog)
        app.state.redis = client
        app.state.catalog = catalog
        app.state.dispatcher = Dispatcher(client, hub, celery, Limits.from_settings(settings))
        try:
            yield
        finally:
            await hub.close()
            await client.aclose()
            celery.close()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan)
    errors.install(app)
    for module in (chat, models, system):
        app.include_router(module.router)
    return app
