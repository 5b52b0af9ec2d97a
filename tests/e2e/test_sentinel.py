"""Redis high availability: the fleet on a primary, a replica and three sentinels (INFERQ_REDIS_URL
``redis+sentinel://``), and the primary killed under steady load. Every non-streamed request the API accepted
completes, every stream ends either complete or with an error event, new requests succeed again within 10 s
of the kill, and no inferq process is restarted."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.fleet import Fleet, write_catalog
from tests.sentinels import SentinelGroup

pytestmark = pytest.mark.e2e

WORKERS = ("s1", "s2")
NEW_REQUESTS_WITHIN = 10.0
# Admission's refusals: the request was never accepted (no job), and the client is told to come back.
REFUSED = {"redis_unavailable", "no_worker_available"}


@pytest.fixture(scope="module")
def group() -> Iterator[SentinelGroup]:
    g = SentinelGroup()
    yield g
    g.stop()


@pytest.fixture(scope="module")
def fleet(group: SentinelGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp: Path = tmp_path_factory.mktemp("sentinel")
    f = Fleet(group.url, tmp, INFERQ_MODELS_FILE=str(write_catalog(tmp / "models.yaml")))
    try:
        f.start_api()
        env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "100"}
        for name in WORKERS:
            f.start_worker(name, "scripted", args=["--engine", "scripted", "--concurrency", "4"], env=env)
        yield f
    finally:
        f.close()


@dataclass
class Outcomes:
    """What each request of the load got, with when it was sent."""

    done: list[float] = field(default_factory=list)
    # When each done one ended: those sent before the kill and ended after it went through the failover.
    ended: list[float] = field(default_factory=list)
    refused: list[tuple[float, str]] = field(default_factory=list)
    failed: list[tuple[float, str]] = field(default_factory=list)
    # Streams that began and then ended with the protocol's error event (Redis went away under them).
    error_events: list[tuple[float, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, sent: float, what: str = "") -> None:
        with self.lock:
            if kind == "done":
                self.done.append(sent)
                self.ended.append(time.monotonic())
            else:
                getattr(self, kind).append((sent, what))


def body(stream: bool, tokens: int) -> dict[str, object]:
    return {
        "model": "scripted",
        "messages": [{"role": "user", "content": "Tell me a long story."}],
        "max_tokens": tokens,
        "stream": stream,
    }


def error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"].get("code"))
    except (ValueError, KeyError, TypeError):
        return f"{r.status_code} {r.text[:80]}"


def non_streamed(base: str, stop: threading.Event, out: Outcomes) -> None:
    while not stop.is_set():
        sent = time.monotonic()
        try:
            r = httpx.post(f"{base}/v1/chat/completions", json=body(False, 30), timeout=60)
        except httpx.HTTPError as exc:
            out.add("failed", sent, repr(exc))
            continue
        if r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 30:
            out.add("done", sent)
        elif r.status_code == 503 and error_code(r) in REFUSED:
            out.add("refused", sent, error_code(r))
            time.sleep(0.1)
        else:
            out.add("failed", sent, f"{r.status_code} {r.text[:200]}")


def streamed(base: str, stop: threading.Event, out: Outcomes) -> None:
    """A stream counts as done when it ended with [DONE] after its whole text, as refused when it was
    turned away before it began (status 503), as an error event when it ended with one; cut without
    either, failed."""
    while not stop.is_set():
        sent = time.monotonic()
        frames: list[str] = []
        try:
            with httpx.stream("POST", f"{base}/v1/chat/completions", json=body(True, 100), timeout=60) as r:
                if r.status_code != 200:
                    r.read()
                    kind = "refused" if r.status_code == 503 and error_code(r) in REFUSED else "failed"
                    out.add(kind, sent, f"{r.status_code} {error_code(r)}")
                    time.sleep(0.1)
                    continue
                frames = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        except httpx.HTTPError as exc:
            out.add("failed", sent, f"cut: {exc!r}")
            continue
        errors = [f for f in frames if f != "[DONE]" and "error" in json.loads(f)]
        if frames and frames[-1] == "[DONE]" and not errors:
            out.add("done", sent)
        elif errors and frames[-1] == "[DONE]":
            out.add("error_events", sent, errors[0][:120])
        else:
            out.add("failed", sent, f"ended without [DONE]: {frames[-2:]}")


def test_killing_the_primary_under_load_loses_no_accepted_request(fleet: Fleet, group: SentinelGroup) -> None:
    assert fleet.api is not None
    before = {name: p.pid for name, p in {**fleet.workers, "api": fleet.api}.items()}
    plain, streams = Outcomes(), Outcomes()
    stop = threading.Event()
    with ThreadPoolExecutor(6) as pool:
        for _ in range(4):
            pool.submit(non_streamed, fleet.base_url, stop, plain)
        for _ in range(2):
            pool.submit(streamed, fleet.base_url, stop, streams)
        time.sleep(3)  # steady load on both workers
        killed = time.monotonic()
        promoted = group.fail_over()
        time.sleep(max(0.0, killed + NEW_REQUESTS_WITHIN + 3 - time.monotonic()))
        stop.set()
    after_kill = [t - killed for t in plain.done if t > killed]
    refused_at = [t - killed for t, _ in plain.refused]
    figures = {
        "promoted_s": round(promoted, 2),
        "first_success_sent_after_kill_s": round(min(after_kill), 2) if after_kill else None,
        "non_streamed": {
            "done": len(plain.done),
            "done_across_the_kill": sum(t < killed < e for t, e in zip(plain.done, plain.ended, strict=True)),
            "refused": len(plain.refused),
            "failed": len(plain.failed),
            # When the refused were sent, from the kill: the first may be just before it (at admission).
            "refused_sent_s": [round(min(sent), 2), round(max(sent), 2)] if (sent := refused_at) else [],
        },
        "streams": {
            "done": len(streams.done),
            "done_across_the_kill": sum(
                t < killed < e for t, e in zip(streams.done, streams.ended, strict=True)
            ),
            "ended_with_error_event": len(streams.error_events),
            "refused": len(streams.refused),
        },
        "stream_failures": len(streams.failed),
        "refusals": sorted({what for _, what in plain.refused + streams.refused}),
        "error_events": sorted({what[:60] for _, what in streams.error_events}),
    }
    print(f"\nprimary killed under load: {figures}")  # noqa: T201 (the figures, shown with -s)

    assert not plain.failed, plain.failed
    assert not streams.failed, streams.failed
    # From 10 s after the kill on, every request was served.
    late = [
        t
        for t, _ in plain.refused + streams.refused + streams.error_events
        if t > killed + NEW_REQUESTS_WITHIN
    ]
    assert not late, figures
    assert [t for t in plain.done if t > killed + NEW_REQUESTS_WITHIN], figures
    assert {name: p.pid for name, p in {**fleet.workers, "api": fleet.api}.items()} == before
    assert all(p.poll() is None for p in [*fleet.workers.values(), fleet.api])
