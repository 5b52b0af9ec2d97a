"""`inferq api --workers 2`: two API processes on one port, sharing nothing but Redis. Streams complete
whichever process takes them, and a background response started through one is replayed whole through
either (each replay a new connection, so both processes serve them)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from ops.redis_server import RedisServer, free_port
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("api-workers")
    catalog = write_catalog(tmp / "models.yaml")
    f = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog))
    try:
        f.port = free_port()
        f.api = f._spawn(["api", "--port", str(f.port), "--workers", "2"], "api.log")
        f._until(lambda: httpx.get(f"{f.base_url}/v1/system/health").status_code in (200, 503), "api up")
        f.start_worker("w1", "scripted", args=["--engine", "scripted", "--concurrency", "16"])
        yield f
    finally:
        f.close()
        server.stop()


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def stream(fleet: Fleet, i: int) -> str:
    body = {"model": "scripted", "messages": [{"role": "user", "content": f"n{i}"}], "max_tokens": 12}
    text, done = "", False
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                for choice in json.loads(line[6:])["choices"]:
                    text += choice["delta"].get("content") or ""
    assert done
    return text


def test_two_processes_serve_one_port(fleet: Fleet) -> None:
    assert fleet.api is not None
    # uvicorn's supervisor and, under it, the two API processes (besides multiprocessing's helper).
    assert len(children(fleet.api.pid)) >= 2
    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(lambda i: stream(fleet, i), range(24)))
    assert all(len(t.split()) == 12 for t in texts), texts


def test_a_background_response_replays_whole_through_either_process(fleet: Fleet) -> None:
    body = {"model": "scripted", "input": "Count.", "background": True, "max_output_tokens": 20}
    created = httpx.post(f"{fleet.base_url}/v1/responses", json=body, timeout=30).json()
    rid = created["id"]
    replays = []
    for _ in range(6):
        events: list[tuple[int, str]] = []
        # A new connection each time: the port's accept queue hands them to either process.
        url = f"{fleet.base_url}/v1/responses/{rid}"
        with httpx.Client(timeout=60) as client, client.stream("GET", url, params={"stream": "true"}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: "):
                    event = json.loads(line[6:])
                    events.append((event["sequence_number"], event["type"]))
        replays.append(events)
    first = replays[0]
    assert [seq for seq, _ in first] == list(range(len(first)))
    assert first[-1][1] == "response.incomplete", first  # its max_output_tokens ran out
    assert all(replay == first for replay in replays)
