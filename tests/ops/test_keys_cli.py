"""`inferq keys` and `inferq usage` against the real admin API (in process, on a real Redis)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from fastapi.testclient import TestClient

from api.app import create_app
from ops import keys_cli
from ops.cli import main
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

ADMIN = "admin-secret"


@pytest.fixture
def http(
    redis_server: RedisServer, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[None]:
    settings = Settings(redis_url=redis_server.url, admin_key=ADMIN)
    with TestClient(create_app(settings, Catalog.load(DEFAULT_CATALOG))) as client:

        def factory(base_url: str, api_key: str | None) -> Any:
            client.headers["authorization"] = f"Bearer {api_key}"
            return contextlib.nullcontext(client)  # the app outlives each command

        monkeypatch.setattr(keys_cli, "http_client", factory)
        yield


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.usefixtures("http")
def test_create_list_revoke_and_usage() -> None:
    code, out, err = run(
        "keys", "--admin-key", ADMIN, "create", "team", "--rpm", "5", "--model", "m", "--max-priority", "low"
    )
    assert code == 0, err
    key = out.strip()
    assert key.startswith("sk-inferq-") and "not shown again" in err
    key_id = err.split()[1]
    code, out, _ = run("keys", "--admin-key", ADMIN, "list")
    assert code == 0
    assert f"{key_id}  team  rpm=5 max_priority=low models=m" in out and key not in out
    code, out, _ = run("usage", "--admin-key", ADMIN)
    assert code == 0 and out.splitlines()[0].startswith("date\tkey_name\tmodel\trequests")
    # Only the admin manages keys: the key itself is refused, with the API's message.
    code, out, err = run("keys", "--admin-key", key, "list")
    assert code == 1 and "HTTP 403" in err
    assert run("keys", "--admin-key", ADMIN, "revoke", key_id)[1].strip() == f"revoked {key_id}"
    code, _, err = run("keys", "--admin-key", ADMIN, "revoke", key_id)
    assert code == 1 and "HTTP 404" in err
