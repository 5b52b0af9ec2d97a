"""Shared fixtures: a real redis-server per test session, on a free port."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from engines.base import Engine
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture(scope="module")
def smollm2_engine() -> Iterator[Engine]:
    """The default model on the real llama.cpp engine, small context, one thread; loaded once per module."""
    llamacpp = pytest.importorskip("engines.llamacpp")
    spec = Catalog.load(DEFAULT_CATALOG).get("smollm2-135m")
    assert spec is not None
    engine: Engine = llamacpp.LlamaCppEngine(spec.sources["llamacpp"].resolve(), n_ctx=256, n_threads=1)
    yield engine
    engine.close()
