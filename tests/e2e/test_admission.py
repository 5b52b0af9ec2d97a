"""Bounded queues end to end (api/admission.py): a model whose queue holds ``INFERQ_MAX_QUEUED`` requests
refuses the next with 429 ``queue_full`` and a Retry-After computed from how fast the queue drained; a client
that obeys it is admitted."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from queueing import keys
from tests.fleet import Fleet, one_slot_scripted_fleet

pytestmark = pytest.mark.e2e

SPEED = 50  # tokens per second
BOUND = 2


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    with one_slot_scripted_fleet(
        tmp_path_factory.mktemp("admission"), "q-one", SPEED, INFERQ_MAX_QUEUED=str(BOUND)
    ) as f:
        yield f


def ask(fleet: Fleet, max_tokens: int, **body: Any) -> httpx.Response:
    payload = {"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens}
    return httpx.post(f"{fleet.base_url}/v1/chat/completions", json={**payload, **body}, timeout=60)


def test_a_full_queue_answers_429_with_a_retry_after_from_its_drain_rate(fleet: Fleet) -> None:
    # Some drain to measure: twelve short requests, then the 5-second bucket they fell in closes.
    for _ in range(12):
        assert ask(fleet, 2).status_code == 200
    time.sleep(keys.DRAIN_BUCKET_SECONDS - time.time() % keys.DRAIN_BUCKET_SECONDS + 0.2)
    statuses: list[int] = []

    def run(max_tokens: int) -> None:
        statuses.append(ask(fleet, max_tokens).status_code)

    # One request holds the only slot for two seconds, two wait: the queue is at its bound.
    threads = [threading.Thread(target=run, args=(tokens,)) for tokens in (2 * SPEED, 2, 2)]
    for t in threads:
        t.start()
        time.sleep(0.2)
    refused = ask(fleet, 2)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "queue_full"
    retry = int(refused.headers["retry-after"])
    print(f"\nrefused: Retry-After {retry}: {refused.json()['error']['message']}")  # noqa: T201 (shown with -s)
    # Twelve claims in the last minute: 0.2 requests/s, one request ahead of the bound: five seconds.
    assert 2 <= retry <= 10, refused.json()["error"]["message"]
    # Anthropic's clients get Anthropic's envelope, and the same Retry-After.
    message = {"model": "scripted", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    anthropic = httpx.post(f"{fleet.base_url}/v1/messages", json=message, timeout=30)
    assert anthropic.status_code == 429 and anthropic.json()["error"]["type"] == "rate_limit_error"
    assert "retry-after" in anthropic.headers
    # A client that obeys Retry-After is admitted, and those that waited all got their answers.
    time.sleep(retry)
    assert ask(fleet, 2).status_code == 200
    for t in threads:
        t.join(60)
    assert statuses == [200, 200, 200]
