"""The API process: ``create_app()`` and the lifespan that owns Redis, the pub/sub hub and the Celery
producer.

Nothing here imports an engine library: jobs are enqueued by task name.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis
import redis.asyncio as aredis
from fastapi import Depends, FastAPI
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from starlette.requests import HTTPConnection

from api import auth, errors
from api.access_log import AccessLogMiddleware
from api.admission import RETRY_COUNT_HEADER, parse_retry_count, requested_retry
from api.auth import key_of, owner_of
from api.batches.driver import BatchDriver
from api.batches.store import BatchStore
from api.files import Files
from api.filestore import LocalFileStore
from api.input_limits import InputLimitsMiddleware
from api.input_limits import Limits as InputLimits
from api.jobs import ROUTING_HEADER, Dispatcher, Limits, parse_routing, requested_routing
from api.keystore import KeyStore
from api.memory import MemoryReturn
from api.metrics import MetricsMiddleware
from api.priority import PRIORITY_HEADER, parse_header, requested_class
from api.queue_position import QueuePositionMiddleware
from api.redis_breaker import RedisBreaker
from api.redis_pool import ShrinkingPool
from api.redis_timeouts import loop_fair
from api.requeue_sweep import RequeueSweep
from api.responses.background import BackgroundResponses
from api.responses.service import Responses
from api.responses.store import ResponseStore
from api.resume import requested_owner
from api.routes import (
    apikeys,
    batches,
    chat,
    completions,
    embeddings,
    files,
    management,
    messages,
    metrics,
    models,
    responses,
    streams,
    system,
)
from api.sessions import SESSION_HEADERS, requested_session, session_digest
from api.streams import StreamHub
from api.tracing import TracingMiddleware
from queueing import tracing
from queueing.catalog import Catalog, get_catalog
from queueing.celery_app import create_celery
from queueing.sentinel import close_sentinels, pool_kwargs
from queueing.settings import Settings, get_settings

logger = logging.getLogger(__name__)


async def _routing_header(connection: HTTPConnection) -> None:
    """Reads the per-request routing override once for every endpoint (see api.jobs.requested_routing);
    an HTTPConnection, so that WebSocket routes (Responses' WebSocket mode) get it too."""
    requested_routing.set(parse_routing(connection.headers.get(ROUTING_HEADER)))
    requested_class.set(parse_header(connection.headers.get(PRIORITY_HEADER)))
    requested_retry.set(parse_retry_count(connection.headers.get(RETRY_COUNT_HEADER)))
    session = next((v for h in SESSION_HEADERS if (v := connection.headers.get(h))), None)
    requested_session.set(session_digest(session))
    requested_owner.set(owner_of(key_of(connection.headers)))


def api_redis(settings: Settings, breaker: RedisBreaker | None = None) -> tuple[aredis.Redis, ShrinkingPool]:
    """The API's Redis client. Short timeouts and no retry on a timeout: while Redis is down or frozen a
    request answers 503 within about ``api_redis_timeout`` (redis-py's default retries would stretch that to
    ~5 s). The timeouts are loop-fair (api/redis_timeouts.py): a reply that came in time counts even when a
    busy loop read it late. One quick retry on a connection error, which is what a pooled connection that a
    Redis restart closed raises: the next connection reconnects. A blocking pool: under a burst a request
    waits for a connection (bounded) instead of failing with "Too many connections"; afterwards it closes
    what the burst opened (api/redis_pool.py)."""
    pool = ShrinkingPool(
        # A plain URL, or a sentinel one whose connections find the master (queueing/sentinel.py).
        **pool_kwargs(settings.redis_url, asyncio=True, sentinel_timeout=settings.api_redis_timeout),
        max_connections=settings.api_redis_max_connections,
        wait=settings.api_redis_pool_timeout,
        socket_timeout=None,
        socket_connect_timeout=None,
        # A connection idle this long is pinged before use, so a restart is found by the check, not by a
        # request's command.
        health_check_interval=5,
        retry=Retry(ExponentialBackoff(cap=0.1, base=0.02), 1, supported_errors=(redis.ConnectionError,)),
    )
    pool.connection_class = loop_fair(pool.connection_class)
    pool.connection_kwargs["command_timeout"] = settings.api_redis_timeout
    # Connecting is part of getting a connection, so it has as long as waiting for one.
    pool.connection_kwargs["connect_timeout"] = settings.api_redis_pool_timeout
    pool.connection_kwargs["breaker"] = breaker
    # from_pool: the client owns the pool, so closing the client closes its connections.
    return aredis.Redis.from_pool(pool), pool


def create_app(settings: Settings | None = None, catalog: Catalog | None = None) -> FastAPI:
    settings = settings or get_settings()
    catalog = catalog or get_catalog()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        breaker = RedisBreaker()
        client, pool = api_redis(settings, breaker)
        breaker.attach(client)
        app.state.breaker = breaker
        hub = StreamHub(settings.redis_url, timeout=settings.api_redis_timeout)
        await hub.start()
        celery = create_celery(settings, catalog)
        app.state.redis = client
        app.state.catalog = catalog
        app.state.keystore = KeyStore(client)
        app.state.dispatcher = Dispatcher(
            client, hub, celery, Limits.from_settings(settings), catalog, settings
        )
        app.state.limiter = app.state.dispatcher.limiter
        app.state.files = Files(client, LocalFileStore(settings.files_dir), settings.file_max_bytes)
        # Every API process drives batches: whichever holds a batch's lease feeds its lines to the fleet.
        app.state.batches = BatchDriver(
            BatchStore(client), app.state.files, app.state.dispatcher, catalog, settings
        )
        app.state.batches.start()
        # Half the socket timeout: a replay's blocking read returns before the client gives up on it.
        stored = ResponseStore(
            client, settings.response_ttl, max_block_ms=int(settings.api_redis_timeout * 500)
        )
        background = BackgroundResponses(app.state.dispatcher, stored, catalog, client)
        background.start()
        app.state.responses = Responses(app.state.dispatcher, stored, catalog, background)
        # Sends again what a dead process queued but never sent (queueing/recovery.py).
        sweep = RequeueSweep(client, celery, settings.heartbeat_interval)
        sweep.start()
        memory = MemoryReturn(pool=pool)
        memory.start()
        try:
            yield
        finally:
            await memory.close()
            await sweep.close()
            await background.close()
            await app.state.batches.stop()
            await hub.close()
            await breaker.close()
            await client.aclose()
            await close_sentinels(pool.connection_kwargs)
            celery.close()
            tracing.flush()

    app = FastAPI(title="inferq", version="0.1.0", lifespan=lifespan, dependencies=[Depends(_routing_header)])
    errors.install(app)
    for module in (
        chat,
        completions,
        embeddings,
        responses,
        messages,
        models,
        files,
        batches,
        streams,
        system,
        management,
        apikeys,
        metrics,
    ):
        app.include_router(module.router)
    # Innermost: a waiting stream's queue position goes out before its response (and the key check's headers
    # are added to whichever response starts).
    app.add_middleware(QueuePositionMiddleware)
    # Bodies are read and checked only once the key check let the request in.
    app.state.input_limits = InputLimits.from_settings(settings)  # also for WebSocket messages
    app.add_middleware(InputLimitsMiddleware, limits=app.state.input_limits)
    # Middleware, not a dependency: it covers every route, also those added later and /docs. Always there:
    # keys created through the admin API (api/keystore.py) are required from the first one on.
    app.add_middleware(auth.AuthMiddleware, keys=auth.Keys.from_settings(settings))
    # Outermost, so that it also counts what the key check turned away.
    app.add_middleware(MetricsMiddleware)
    # Around the rest: every request gets its id (x-request-id) and, when on, its access log line.
    app.add_middleware(AccessLogMiddleware, enabled=settings.access_log)
    # Off unless OTEL_* variables ask for it (queueing/tracing.py); outermost, around the access log too.
    if tracing.setup("inferq-api"):
        app.add_middleware(TracingMiddleware)
    return app
