"""Fair shares end to end (api/fairness.py): a key that queued a backlog while it was alone does not stand in
front of a key that comes later; the newcomer's request is served next.

One scripted worker with one slot at a fixed speed: what is timed is the scheduling (API, Redis, Celery and
worker are real)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fleet import Fleet, one_slot_scripted_fleet

pytestmark = pytest.mark.e2e

SPEED = 50  # tokens per second


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    tmp: Path = tmp_path_factory.mktemp("fairness")
    with one_slot_scripted_fleet(tmp, "f-one", SPEED, INFERQ_API_KEYS="k-heavy,k-light") as f:
        yield f


def ask(fleet: Fleet, key: str, max_tokens: int) -> httpx.Response:
    return httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        json={"model": "scripted", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": max_tokens},
        headers={"authorization": f"Bearer {key}"},
        timeout=60,
    )


def test_a_newcomer_goes_before_the_backlog_a_key_queued_while_alone(fleet: Fleet) -> None:
    done: list[str] = []

    def run(name: str, key: str, max_tokens: int) -> None:
        r = ask(fleet, key, max_tokens)
        assert r.status_code == 200, r.text
        done.append(name)

    # The heavy key, alone: one request holds the only slot for a second and a half, three more queue.
    threads = [threading.Thread(target=run, args=("heavy-0", "k-heavy", 3 * SPEED // 2))]
    threads += [threading.Thread(target=run, args=(f"heavy-{i}", "k-heavy", 3)) for i in (1, 2, 3)]
    threads.append(threading.Thread(target=run, args=("light", "k-light", 3)))
    for t in threads:
        t.start()
        time.sleep(0.15)
    for t in threads:
        t.join(60)
    # First come, first served would give heavy-0..3, then light.
    assert done[:2] == ["heavy-0", "light"], done
    assert sorted(done[2:]) == ["heavy-1", "heavy-2", "heavy-3"]
