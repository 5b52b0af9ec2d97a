"""Redis frozen (SIGSTOP: sockets open, nothing answered) for 10 s under a running fleet.

What the README promises for an outage: health and new requests answer 503 ``redis_unavailable`` within a
second; a stream running through it ends with its protocol's error event and final sentinel (not a silent
cut, not a hang until Redis returns); a non-streamed request whose worker finished during the outage gets its
result once Redis is back (not a 503); and the fleet serves again within 2 s of Redis returning, with no
process restarted. One freeze covers all of it (each costs 10 s). The streams and the non-streamed request
run on a scripted worker (their length and timing are the point, not their text); recovery is proven on it
and on a real llama.cpp worker.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest
import redis

from ops.redis_server import RedisServer
from queueing.jobstore import JobStore
from tests.fleet import Fleet, freeze, thaw, write_catalog

pytestmark = pytest.mark.e2e

FROZEN_FOR = 10.0
# The acceptance bounds: answers while frozen, and the first request served after Redis returns.
ANSWER_WITHIN = 1.0
RECOVER_WITHIN = 2.0
# A stream must be ended by the outage, long before Redis returns (the watchdog's next look fails ~1 s in).
STREAM_ENDS_WITHIN = 3.0
TOKENS = 60


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    thaw(server)  # never leave a stopped process behind a failed test
    server.stop()


@pytest.fixture(scope="module")
def fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp = tmp_path_factory.mktemp("redis-outage")
    catalog = tmp / "models.yaml"
    write_catalog(catalog, smollm2=True)
    f = Fleet(redis_server.url, tmp, INFERQ_MODELS_FILE=str(catalog), INFERQ_REQUEST_TIMEOUT="40")
    try:
        f.start_api()
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "20"}
        f.start_worker(
            "s1", "scripted", wait=False, args=["--engine", "scripted", "--concurrency", "8"], env=env
        )
        f.start_worker("l1", "smollm2-135m", wait=False)
        f.wait_listed("s1")
        f.wait_listed("l1")
        yield f
    finally:
        f.close()


@dataclass
class Streamed:
    """One SSE stream as read off the wire: its frames (event name, data) and when it ended."""

    frames: list[tuple[str | None, str]] = field(default_factory=list)
    started: threading.Event = field(default_factory=threading.Event)
    ended_at: float = 0.0
    error: str | None = None

    @property
    def last(self) -> tuple[str | None, str]:
        return self.frames[-1]


def read_sse(url: str, body: dict[str, object], out: Streamed, content: str) -> None:
    """Reads the stream until the server ends it; ``out.started`` once a frame holding ``content`` came."""
    event: str | None = None
    try:
        with httpx.stream("POST", url, json=body, timeout=30) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[len("event: ") :]
                elif line.startswith("data: "):
                    data = line[len("data: ") :]
                    out.frames.append((event, data))
                    if content in data:
                        out.started.set()
                elif line == "":
                    event = None
    except httpx.HTTPError as exc:
        out.error = repr(exc)
    finally:
        out.ended_at = time.monotonic()


def long_prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Tell me a long story."}]


def timed(method: str, url: str, timeout: float = 10, **kw: object) -> tuple[httpx.Response, float]:
    t0 = time.monotonic()
    r = httpx.request(method, url, timeout=timeout, **kw)  # type: ignore[arg-type]
    return r, time.monotonic() - t0


def test_redis_frozen_10s(fleet: Fleet, redis_server: RedisServer) -> None:
    base = fleet.base_url
    before = {name: p.pid for name, p in {**fleet.workers, "api": fleet.api}.items() if p is not None}
    rconn = redis.Redis.from_url(redis_server.url, socket_timeout=2)
    store = JobStore(rconn)
    # 20 tokens/s for 400 tokens: 20 s, so every stream is still running when Redis freezes and after it
    # returns; only the outage can end them early.
    chat_s, messages_s, responses_s = Streamed(), Streamed(), Streamed()
    streams = {"chat": chat_s, "messages": messages_s, "responses": responses_s}
    with ThreadPoolExecutor(8) as pool:
        pool.submit(
            read_sse,
            f"{base}/v1/chat/completions",
            {"model": "scripted", "messages": long_prompt(), "max_tokens": 400, "stream": True},
            chat_s,
            '"content":',
        )
        pool.submit(
            read_sse,
            f"{base}/v1/messages",
            {"model": "scripted", "messages": long_prompt(), "max_tokens": 400, "stream": True},
            messages_s,
            '"text_delta"',
        )
        pool.submit(
            read_sse,
            f"{base}/v1/responses",
            {"model": "scripted", "input": "Tell me a long story.", "max_output_tokens": 400, "stream": True},
            responses_s,
            "response.output_text.delta",
        )
        for name, s in streams.items():
            assert s.started.wait(30), f"the {name} stream never produced text: {s.frames} {s.error}"
        # A non-streamed request, frozen under half a second after it starts: 60 tokens at 20 tokens/s.
        # The scripted engine keeps wall-clock time (it catches up after a pause), so the generation ends
        # ~3 s in, inside the freeze, however long the worker's calls to the frozen Redis block it.
        body = {"model": "scripted", "messages": long_prompt(), "max_tokens": TOKENS}
        pending_from = time.monotonic()
        pending: Future[tuple[httpx.Response, float]] = pool.submit(
            timed, "POST", f"{base}/v1/chat/completions", json=body, timeout=60
        )
        deadline = time.monotonic() + 30
        while len(store.running_on("s1")) < len(streams) + 1:
            if pending.done():
                pending.result()  # its error, if it failed
            assert time.monotonic() < deadline, "the non-streamed job never started"
            time.sleep(0.02)
        time.sleep(0.5)

        freeze(redis_server)
        frozen_at = time.monotonic()
        try:
            health, health_s = timed("GET", f"{base}/v1/system/health")
            chat_body = {"model": "scripted", "messages": long_prompt(), "max_tokens": 4}
            new, new_s = timed("POST", f"{base}/v1/chat/completions", json=chat_body)
            ended = {name: s.ended_at - frozen_at for name, s in streams.items() if s.ended_at}
            deadline = frozen_at + STREAM_ENDS_WITHIN
            while len(ended) < len(streams) and time.monotonic() < deadline:
                time.sleep(0.05)
                ended = {name: s.ended_at - frozen_at for name, s in streams.items() if s.ended_at}
            # A second look while still frozen: answers stay fast after the first timeouts (no backlog).
            time.sleep(max(0.0, frozen_at + FROZEN_FOR / 2 - time.monotonic()))
            health2, health2_s = timed("GET", f"{base}/v1/system/health")
            time.sleep(max(0.0, frozen_at + FROZEN_FOR - time.monotonic()))
        finally:
            thaw(redis_server)
        back_at = time.monotonic()

        # Recovery: new requests, to each engine's worker, until each was served.
        recovered: dict[str, float] = {}
        failures: list[str] = []
        while time.monotonic() - back_at < 10 and len(recovered) < 2:
            for model in {"scripted", "smollm2-135m"} - set(recovered):
                try:
                    probe = {**chat_body, "model": model}
                    r = httpx.post(f"{base}/v1/chat/completions", json=probe, timeout=5)
                    if r.status_code == 200:
                        recovered[model] = time.monotonic() - back_at
                    else:
                        failures.append(f"{model}: {r.status_code} {r.text[:120]}")
                except httpx.HTTPError as exc:
                    failures.append(f"{model}: {exc!r}")
            time.sleep(0.05)
        result, took = pending.result(timeout=60)
        result_s = pending_from + took - back_at

    figures = {
        "health_s": round(health_s, 3),
        "health_again_s": round(health2_s, 3),
        "new_request_s": round(new_s, 3),
        "streams_ended_s": {k: round(v, 2) for k, v in ended.items()},
        "recovered_s": {k: round(v, 3) for k, v in recovered.items()},
        "failures_before_recovery": len(failures),
        "non_stream_result_after_thaw_s": round(result_s, 2),
    }
    print(f"\nRedis frozen {FROZEN_FOR:.0f} s: {figures}")  # noqa: T201 (the figures, shown with -s)

    # Health and a new request: 503 in the OpenAI envelope, within a second, each time.
    assert health.status_code == 503 and health.json()["redis"] is False, health.text
    assert health2.status_code == 503, health2.text
    assert health_s <= ANSWER_WITHIN and health2_s <= ANSWER_WITHIN, figures
    assert new.status_code == 503, new.text
    assert new.json()["error"]["code"] == "redis_unavailable", new.text
    assert new.json()["error"]["type"] == "service_unavailable_error", new.text
    assert new_s <= ANSWER_WITHIN, figures

    # Every running stream ended during the outage, and ended cleanly in its protocol's terms.
    assert set(ended) == set(streams), f"streams still open {STREAM_ENDS_WITHIN} s into the outage: {figures}"
    for name, s in streams.items():
        assert s.error is None, f"{name} stream cut instead of ended: {s.error}"
    # OpenAI chat: a data frame holding the error envelope (the SDK raises APIError on it), then [DONE].
    assert chat_s.last == (None, "[DONE]"), chat_s.frames[-3:]
    err = json.loads(chat_s.frames[-2][1])["error"]
    assert err["code"] == "redis_unavailable" and err["type"] == "service_unavailable_error", err
    # Anthropic Messages: the `error` event is the last event (no message_stop follows it).
    event, data = messages_s.last
    assert event == "error", messages_s.frames[-3:]
    anthropic = json.loads(data)
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == "overloaded_error", data
    assert "message_stop" not in {e for e, _ in messages_s.frames}, messages_s.frames[-3:]
    # Responses: an `error` event, then `response.failed` (the terminal event), numbered in sequence.
    (e_event, e_data), (f_event, f_data) = responses_s.frames[-2:]
    assert (e_event, f_event) == ("error", "response.failed"), responses_s.frames[-3:]
    assert json.loads(e_data)["error"]["code"] == "redis_unavailable", e_data
    failed = json.loads(f_data)
    assert failed["response"]["status"] == "failed", f_data
    assert failed["sequence_number"] == json.loads(e_data)["sequence_number"] + 1, (e_data, f_data)

    # Served again within 2 s of Redis returning, by the same processes.
    assert set(recovered) == {"scripted", "smollm2-135m"}, (figures, failures[-3:])
    assert max(recovered.values()) <= RECOVER_WITHIN, (figures, failures[-3:])
    assert {name: p.pid for name, p in {**fleet.workers, "api": fleet.api}.items() if p is not None} == before
    assert all(p.poll() is None for p in fleet.workers.values())

    # The non-streamed request, whose generation was due to end ~3 s into the outage: its whole result,
    # delivered once Redis returned (its record is written then), not a 503 while it was away.
    assert result.status_code == 200, result.text
    completion = result.json()
    assert completion["usage"]["completion_tokens"] == TOKENS, completion["usage"]
    assert completion["choices"][0]["finish_reason"] == "length", completion
    assert len(completion["choices"][0]["message"]["content"].split()) == TOKENS, completion
    assert 0 < result_s <= RECOVER_WITHIN, figures
    rconn.close()
