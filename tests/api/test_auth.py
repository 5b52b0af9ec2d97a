"""API keys, in-process against a real Redis: a sweep of every route the app has (including routes other
modules add later), plus the key rules themselves."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import errors
from api.app import create_app
from api.auth import Keys
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

USER, OTHER, ADMIN = "sk-user-1", "sk-user-2", "sk-admin"
OPEN = {"/v1/system/health", "/metrics"}


def settings(url: str, **kw: Any) -> Settings:
    return Settings(redis_url=url, no_worker_timeout=0.3, heartbeat_interval=0.1, load_timeout=0.3, **kw)


def all_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every route, walking included routers; path parameters filled in."""
    found: list[tuple[str, str]] = []

    def walk(routes: list[Any]) -> None:
        for r in routes:
            if hasattr(r, "original_router"):
                walk(r.original_router.routes)
            elif hasattr(r, "path"):
                path = re.sub(r"\{[^}]+\}", "x", r.path)
                found.extend((m, path) for m in sorted(getattr(r, "methods", None) or {"GET"}) if m != "HEAD")

    walk(app.routes)
    return found


def is_management_write(method: str, path: str) -> bool:
    """Routes only the admin key may use: management writes, and every route of managed keys and usage."""
    keys_route = path.startswith(("/v1/system/keys", "/v1/system/usage"))
    return keys_route or (path.startswith("/v1/system/") and method not in ("GET", "HEAD", "OPTIONS"))


@pytest.fixture
def app(redis_server: RedisServer, redis_client: redis.Redis) -> FastAPI:
    return create_app(
        settings(redis_server.url, api_keys=f"{USER}, {OTHER}", admin_key=ADMIN),
        Catalog.load(DEFAULT_CATALOG),
    )


@pytest.fixture
def http(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


def call(http: TestClient, method: str, path: str, key: str | None) -> Any:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    # A body that fails validation: the route's own work is not what is tested here.
    return http.request(method, path, headers=headers, content=b"{" if method != "GET" else None)


def test_sweep_of_every_route(app: FastAPI, http: TestClient) -> None:
    routes = all_routes(app)
    assert ("POST", "/v1/chat/completions") in routes and ("GET", "/v1/system/health") in routes
    writes = [r for r in routes if is_management_write(*r)]
    assert writes, "the sweep should meet management writes"
    for method, path in routes:
        anonymous = call(http, method, path, None)
        if path in OPEN:
            assert anonymous.status_code not in (401, 403), (method, path)
            continue
        assert anonymous.status_code == 401, (method, path)
        if errors.is_anthropic(path):
            assert anonymous.json()["error"]["type"] == "authentication_error", path
        else:
            assert anonymous.json()["error"]["code"] == "invalid_api_key", (method, path)
        assert call(http, method, path, "sk-wrong").status_code == 401, (method, path)
        as_user = call(http, method, path, USER)
        as_admin = call(http, method, path, ADMIN)
        assert as_admin.status_code not in (401, 403), (method, path)
        if is_management_write(method, path):
            assert as_user.status_code == 403, (method, path)
            assert as_user.json()["error"]["type"] == "permission_error"
        else:
            assert as_user.status_code not in (401, 403), (method, path)
        assert as_user.status_code < 500 and as_admin.status_code < 500, (method, path)


def test_unknown_paths_need_a_key_too(http: TestClient) -> None:
    assert http.get("/v1/nope").status_code == 401
    assert http.get("/v1/nope", headers={"authorization": f"Bearer {OTHER}"}).status_code == 404


def test_malformed_authorization_headers_are_401(http: TestClient) -> None:
    for value in [USER, f"Basic {USER}", "Bearer", "Bearer ", f"bearer  {USER}x"]:
        assert http.get("/v1/models", headers={"authorization": value}).status_code == 401, value
    assert http.get("/v1/models", headers={"authorization": f"bearer {USER}"}).status_code == 200


def test_keys_from_a_file_and_never_logged(
    redis_server: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys = tmp_path / "keys"
    keys.write_text(f"# comment\n{USER}\n\n{OTHER}\n")
    caplog.set_level(logging.DEBUG)
    with TestClient(
        create_app(settings(redis_server.url, api_keys=str(keys)), Catalog.load(DEFAULT_CATALOG))
    ) as c:
        assert c.get("/v1/models", headers={"authorization": f"Bearer {OTHER}"}).status_code == 200
        assert c.get("/v1/models", headers={"authorization": "Bearer # comment"}).status_code == 401
        # No admin key configured: any valid key may make management writes.
        r = c.post("/v1/system/models/x/pin", headers={"authorization": f"Bearer {USER}"}, content=b"{")
        assert r.status_code not in (401, 403)
    text = caplog.text
    assert "API keys required" in text
    assert USER not in text and OTHER not in text


def test_no_keys_configured_means_open_until_a_managed_key_exists(redis_server: RedisServer) -> None:
    keys = Keys.from_settings(settings(redis_server.url))
    assert keys.check("POST", "/v1/chat/completions", None) is None
    assert keys.check("POST", "/v1/system/models/m/load", None) is None
    # Once a key was created through the admin API (api/keystore.py), every request needs a key.
    denied = keys.check("POST", "/v1/chat/completions", None, required=True)
    assert denied is not None and denied.status == 401


def test_admin_key_alone_guards_only_management_writes(redis_server: RedisServer) -> None:
    keys = Keys.from_settings(settings(redis_server.url, admin_key=ADMIN))
    assert keys is not None
    assert keys.check("POST", "/v1/chat/completions", None) is None
    assert keys.check("GET", "/v1/system/workers", None) is None
    denied = keys.check("POST", "/v1/system/models/m/load", None)
    assert denied is not None and denied.status == 401
    assert keys.check("POST", "/v1/system/models/m/load", ADMIN.encode()) is None


def test_an_empty_key_list_is_a_configuration_error(redis_server: RedisServer) -> None:
    with pytest.raises(ValueError):
        Keys.from_settings(settings(redis_server.url, api_keys=" , "))
