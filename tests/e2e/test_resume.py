"""Resuming a stream (api/resume.py) with real workers and real API processes: a client that lost its
connection, or whose API process was killed, reconnects with ``Last-Event-ID`` and gets exactly the rest; a
client that never comes back has its job cancelled after the reconnect grace; a streamed response resumes
with ``starting_after`` as the Responses API's own clients do."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
import redis

from engines.scripted import WORDS
from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from tests.fleet import Fleet, write_catalog

pytestmark = pytest.mark.e2e

GRACE = 2.0


@dataclass
class Sse:
    """The events of an SSE stream as read: (id, data), in order."""

    events: list[tuple[str | None, str]] = field(default_factory=list)
    done: bool = False

    @property
    def ids(self) -> list[str]:
        return [i for i, _ in self.events if i is not None]

    def text(self, kind: str) -> str:
        out = []
        for _, data in self.events:
            chunk = json.loads(data)
            for choice in chunk.get("choices", []):
                out.append(choice["delta"].get("content") or "" if kind == "chat" else choice["text"])
        return "".join(out)


def read_sse(lines: Iterator[str], into: Sse, stop_after: int | None = None) -> None:
    """Reads events from a response's ``iter_lines()`` into ``into`` until [DONE], or until ``stop_after``
    of them were read (the rest stays to be read)."""
    event_id: str | None = None
    for line in lines:
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            if data == "[DONE]":
                into.done = True
                return
            into.events.append((event_id, data))
            event_id = None
            if stop_after is not None and len(into.events) >= stop_after:
                return


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    server = RedisServer()
    tmp = tmp_path_factory.mktemp("resume")
    catalog = write_catalog(tmp / "models.yaml", smollm2=True)
    f = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog), INFERQ_STREAM_RECONNECT_GRACE=str(GRACE))
    try:
        f.start_api()
        f.start_worker("rs-llama")
        f.start_worker("rs-scripted", "scripted", env={"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "40"})
        yield f
    finally:
        f.close()
        server.stop()


def job_state(fleet: Fleet, job_id: str) -> str | None:
    r = redis.Redis.from_url(fleet.env["INFERQ_REDIS_URL"])
    try:
        state = r.hget(keys.job_key(job_id), "state")
        return None if state is None else text(state)
    finally:
        r.close()


CHAT = {
    "model": "smollm2-135m",
    "messages": [{"role": "user", "content": "Write a long story about a lighthouse keeper."}],
    "temperature": 0,
    "max_tokens": 300,
    "stream": True,
}


def test_api_killed_mid_stream_a_second_api_process_gives_exactly_the_rest(fleet: Fleet) -> None:
    whole = Sse()
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=CHAT, timeout=120) as r:
        read_sse(r.iter_lines(), whole)
    assert whole.done and len(whole.ids) == len(whole.events), "every event has an id"
    assert len(set(whole.ids)) == len(whole.ids)

    first = Sse()
    url = f"{fleet.base_url}/v1/chat/completions"
    # The read that the kill breaks, after whatever was already on its way.
    with pytest.raises(httpx.HTTPError), httpx.stream("POST", url, json=CHAT, timeout=120) as r:
        lines = r.iter_lines()
        read_sse(lines, first, stop_after=20)
        fleet.kill_api()
        read_sse(lines, first)
    stream_id = json.loads(first.events[0][1])["id"]
    fleet.start_api()  # another process, on another port
    rest = Sse()
    headers = {"Last-Event-ID": first.ids[-1]}
    url = f"{fleet.base_url}/v1/streams/{stream_id}"
    with httpx.stream("GET", url, headers=headers, timeout=120) as r:
        assert r.status_code == 200, r.read()
        read_sse(r.iter_lines(), rest)
    assert rest.done
    assert not set(first.ids) & set(rest.ids), "nothing repeated"
    joined = first.text("chat") + rest.text("chat")
    assert joined == whole.text("chat"), "nothing missing: the same text as an uninterrupted run"
    assert len(joined) > 200


def scripted_words(n: int) -> str:
    return "".join(" " + WORDS[i % len(WORDS)] for i in range(1, n + 1))


@pytest.mark.parametrize(
    ("path", "kind", "body"),
    [
        ("/v1/completions", "completions", {"prompt": "Once upon a time", "max_tokens": 60}),
        ("/v1/chat/completions", "chat", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 60}),
    ],
)
def test_a_client_that_comes_back_within_the_grace_gets_the_rest(
    fleet: Fleet, path: str, kind: str, body: dict[str, object]
) -> None:
    request = {"model": "scripted", "stream": True, **body}
    before = scripted_usage(fleet)
    first = Sse()
    with httpx.stream("POST", fleet.base_url + path, json=request, timeout=60) as r:
        read_sse(r.iter_lines(), first, stop_after=10)
    # Gone for a while (the job goes on meanwhile), then back, with the id as a query parameter this time.
    time.sleep(GRACE / 2)
    stream_id = json.loads(first.events[0][1])["id"]
    rest = Sse()
    params = {"last_event_id": first.ids[-1]}
    with httpx.stream("GET", f"{fleet.base_url}/v1/streams/{stream_id}", params=params, timeout=60) as r:
        assert r.status_code == 200, r.read()
        read_sse(r.iter_lines(), rest)
    assert rest.done and not set(first.ids) & set(rest.ids)
    assert first.text(kind) + rest.text(kind) == scripted_words(60)
    assert job_state(fleet, stream_id) == "done"
    # The usage ledger: the request its client left counts as one that failed, the resumed one counts the
    # tokens, once.
    after = scripted_usage(fleet)
    grew = {k: after[k] - before.get(k, 0) for k in ("requests", "errors", "completion_tokens")}
    assert grew == {"requests": 2, "errors": 1, "completion_tokens": 60}


def scripted_usage(fleet: Fleet) -> dict[str, int]:
    """Today's usage ledger row of the scripted model (no keys here: the anonymous caller's)."""
    rows = httpx.get(f"{fleet.base_url}/v1/system/usage", timeout=30).json()["data"]
    (row,) = [r for r in rows if r["model"] == "scripted"] or [{}]
    return {k: int(v) for k, v in row.items() if isinstance(v, int)}


def test_a_client_that_never_comes_back_has_its_job_cancelled_after_the_grace(fleet: Fleet) -> None:
    request = {"model": "scripted", "stream": True, "prompt": "Tell me", "max_tokens": 2000}
    first = Sse()
    with httpx.stream("POST", f"{fleet.base_url}/v1/completions", json=request, timeout=60) as r:
        read_sse(r.iter_lines(), first, stop_after=3)
    left = time.monotonic()
    stream_id = json.loads(first.events[0][1])["id"]
    time.sleep(GRACE / 2)
    assert job_state(fleet, stream_id) == "running", "still running within the grace"
    while job_state(fleet, stream_id) != "cancelled":
        assert time.monotonic() - left < GRACE + 5, job_state(fleet, stream_id)
        time.sleep(0.1)
    gone = httpx.get(f"{fleet.base_url}/v1/streams/{stream_id}", timeout=10)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "stream_not_found"


def test_resume_answers_bad_ids_in_the_openai_envelope(fleet: Fleet) -> None:
    unknown = httpx.get(f"{fleet.base_url}/v1/streams/chatcmpl-nope", timeout=10)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "stream_not_found"
    bad = httpx.get(
        f"{fleet.base_url}/v1/streams/chatcmpl-nope", headers={"Last-Event-ID": "yesterday"}, timeout=10
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "last_event_id"


def test_a_streamed_response_resumes_on_a_second_api_process_with_starting_after(fleet: Fleet) -> None:
    """The Responses API's own resume (``GET /v1/responses/{id}?stream=true&starting_after=N``, as the
    official SDK calls it), for a foreground stream whose API process was killed."""
    client = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="none", max_retries=0)
    request: dict[str, Any] = {"model": "scripted", "input": "Tell me", "max_output_tokens": 80}
    request["stream"] = True
    first: list[Any] = []
    with pytest.raises(openai.APIError):
        for event in client.responses.create(**request):
            first.append(event)
            if len(first) == 12:
                fleet.kill_api()
    response_id = first[0].response.id
    fleet.start_api()
    client = openai.OpenAI(base_url=f"{fleet.base_url}/v1", api_key="none", max_retries=0)
    rest = list(client.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number))

    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers))), "nothing repeated, nothing missing"
    deltas = [e for e in first + rest if e.type == "response.output_text.delta"]
    assert deltas[0] in first and deltas[-1] in rest
    assert "".join(e.delta for e in deltas) == scripted_words(80)
    assert {e.item_id for e in deltas} == {first[-1].item_id}, "the same message, under the same id"
    done = rest[-1]
    # Ended by max_output_tokens, as the Responses API ends such an answer.
    assert done.type == "response.incomplete" and done.response.id == response_id
    assert done.response.created_at == first[0].response.created_at
    assert done.response.output_text == scripted_words(80)
    # An EventSource's way: each event's SSE id is its sequence number, sent back as Last-Event-ID.
    url = f"{fleet.base_url}/v1/responses/{response_id}"
    # (The key the SDK sent: a response is its creator's.)
    headers = {"Last-Event-ID": "20", "Authorization": "Bearer none"}
    with httpx.stream("GET", url, params={"stream": "true"}, headers=headers, timeout=60) as r:
        assert r.status_code == 200, r.read()
        ids = [line[3:].strip() for line in r.iter_lines() if line.startswith("id:")]
    assert ids == [str(n) for n in range(21, len(numbers))]
    # Stored as any streamed response is (store defaults to true), by the process that ended it.
    assert client.responses.retrieve(response_id).output_text == scripted_words(80)
    stale = httpx.get(f"{fleet.base_url}/v1/responses/resp_nope", params={"stream": "true"}, timeout=10)
    assert stale.status_code == 404 and stale.json()["error"]["code"] == "not_found"
