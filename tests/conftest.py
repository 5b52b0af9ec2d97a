"""Shared fixtures: a real redis-server per test session, on a free port. The session's schemathesis seed and
the engines it requires (tests/_engines.py) in its header."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import pytest
import redis

from engines.base import Engine
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from tests import _engines

SCHEMATHESIS_SEED = "INFERQ_SCHEMATHESIS_SEED"


def pytest_configure(config: pytest.Config) -> None:
    # A new seed every run, so schemathesis explores new inputs each time; chosen before collection, so the
    # session header can print it and a failing run can be repeated with it.
    if not os.environ.get(SCHEMATHESIS_SEED):
        os.environ[SCHEMATHESIS_SEED] = str(random.SystemRandom().randrange(2**32))
    if unknown := _engines.unknown_required():
        raise pytest.UsageError(f"{_engines.REQUIRE} names no engine called {', '.join(unknown)}")


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = os.environ[SCHEMATHESIS_SEED]
    engines = ", ".join(_engines.required()) or f"none (a missing engine skips; {_engines.REQUIRE} is empty)"
    return [
        f"schemathesis seed: {seed} ({SCHEMATHESIS_SEED}={seed} repeats it)",
        f"engines required: {engines}",
    ]


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
    llamacpp = _engines.import_engine("llamacpp", "engines.llamacpp")
    spec = Catalog.load(DEFAULT_CATALOG).get("smollm2-135m")
    assert spec is not None
    engine: Engine = llamacpp.LlamaCppEngine(spec.sources["llamacpp"].resolve(), n_ctx=256, n_threads=1)
    yield engine
    engine.close()
