"""The OpenAI SDK against a real API, real Redis, a real Celery worker and the real SmolLM2 model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write one sentence about the sea."}]


def test_lists_models_with_their_workers(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    extra: dict[str, Any] = models[0].model_extra or {}
    assert extra["engine"] == "llamacpp"
    assert extra["workers"] == ["e2e-w1"]
    assert client.models.retrieve(MODEL).id == MODEL


def test_non_stream_completion_has_text_and_usage(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=20)
    done = raw.parse()
    assert raw.headers["x-inferq-worker"] == "e2e-w1"
    assert done.object == "chat.completion"
    assert done.choices[0].message.role == "assistant"
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None
    assert done.usage.prompt_tokens > 10
    assert 0 < done.usage.completion_tokens <= 20
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_stream_relays_chunks_role_first_finish_last(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert all(c.usage is None for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks).strip()


def test_stream_include_usage_ends_with_a_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None and last.usage.completion_tokens == 12
    assert chunks[-2].choices[0].finish_reason == "length"


def test_max_tokens_gives_finish_reason_length(client: openai.OpenAI) -> None:
    done = client.chat.completions.create(
        model=MODEL, messages=HELLO, max_completion_tokens=5, extra_body={"ignore_eos": True}
    )
    assert done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 5


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_ends_generation_before_it(client: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 60, "temperature": 0}
    free = client.chat.completions.create(**kwargs).choices[0].message.content or ""
    words = free.split()
    assert len(words) > 3, free
    stop = " " + words[2]
    if stream:
        chunks = list(client.chat.completions.create(**kwargs, stop=[stop], stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        done = client.chat.completions.create(**kwargs, stop=stop)
        text, reason = done.choices[0].message.content or "", done.choices[0].finish_reason
    assert reason == "stop"
    assert stop not in text
    assert free.startswith(text)
    assert len(text) < len(free)


def test_seed_makes_sampling_repeatable(client: openai.OpenAI) -> None:
    def ask(seed: int, temperature: float) -> str:
        done = client.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=24, temperature=temperature, seed=seed
        )
        return done.choices[0].message.content or ""

    assert ask(7, 0.0) == ask(7, 0.0) == ask(8, 0.0)
    assert ask(7, 1.0) == ask(7, 1.0)
    assert len({ask(s, 1.0) for s in (1, 2, 3)}) > 1


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    err = _error(info.value)
    assert err["code"] == "model_not_found" and err["param"] == "model"


def test_schema_violation_is_400_naming_the_field(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, temperature=3.5)
    err = _error(info.value)
    assert err["type"] == "invalid_request_error" and err["param"] == "temperature"

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "x"}])  # type: ignore[misc,list-item]
    assert _error(info.value)["param"] == "messages[0].role"


@pytest.mark.parametrize("n", [0, 17])
def test_n_out_of_range_is_refused(client: openai.OpenAI, n: int) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=HELLO, n=n)
    assert _error(info.value)["param"] == "n"


def test_malformed_json_is_400(fleet: Fleet) -> None:
    r = httpx.post(
        f"{fleet.base_url}/v1/chat/completions",
        content=b'{"model": ',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "invalid_request_error"
    assert r.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("stream", [False, True])
def test_prompt_longer_than_context_is_400(client: openai.OpenAI, stream: bool) -> None:
    long: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hello " * 700}
    ]  # the test catalog serves a 512-token context
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=long, stream=stream)
    err = _error(info.value)
    assert err["code"] == "context_length_exceeded"
    assert "512" in err["message"]


def test_known_model_without_worker_is_503_after_bounded_wait(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(model="smollm2-unserved", messages=HELLO)
    assert info.value.status_code == 503
    assert _error(info.value)["code"] == "no_worker_available"


def test_health_reports_redis_workers_and_models(fleet: Fleet) -> None:
    body = httpx.get(f"{fleet.base_url}/v1/system/health").json()
    assert body == {"status": "ok", "redis": True, "workers": ["e2e-w1"], "models": [MODEL]}


def test_sse_wire_format_ends_with_done(fleet: Fleet) -> None:
    payload = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{fleet.base_url}/v1/chat/completions", json=payload, timeout=60) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-inferq-worker"] == "e2e-w1"
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all(json.loads(d)["object"] == "chat.completion.chunk" for d in data[:-1])
