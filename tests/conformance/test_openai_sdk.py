"""The official ``openai`` Python SDK over every endpoint, streamed and not, against a real fleet with keys.

Structured output is checked for shape and validity (it parses, it validates against its schema), never for
whether the 135M model said something smart.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.conformance.conftest import MODEL
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write one sentence about the sea."}]
WEATHER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "city": {"type": "string"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
}
WEATHER: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
    },
}
TIME_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"timezone": {"type": "string"}},
    "required": ["timezone"],
}
TIME: ChatCompletionToolParam = {
    "type": "function",
    "function": {"name": "get_time", "description": "Current time in a timezone", "parameters": TIME_SCHEMA},
}
ASK_WEATHER: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}


def _error(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


# --- completions ---


@pytest.mark.parametrize("stream", [False, True])
def test_completion_of_a_prompt(sdk: openai.OpenAI, stream: bool) -> None:
    # Seeded: the same seed gives the same text, so the streamed and the whole text can be compared.
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "prompt": "The capital of France is",
        "max_tokens": 8,
        "seed": 0,
    }
    if not stream:
        done = sdk.completions.create(**kwargs, temperature=0)
        assert done.object == "text_completion"
        assert done.choices[0].text and done.choices[0].finish_reason in ("stop", "length")
        assert done.usage is not None and done.usage.prompt_tokens == 5
        assert 0 < done.usage.completion_tokens <= 8
        return
    chunks = list(
        sdk.completions.create(**kwargs, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    same = sdk.completions.create(**kwargs, temperature=0)
    assert text == same.choices[0].text


def test_completion_of_several_prompts_times_n(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(
        model=MODEL, prompt=["Once upon a time", "The sea is"], n=2, max_tokens=6, seed=3, temperature=1.0
    )
    assert [c.index for c in done.choices] == [0, 1, 2, 3]
    assert all(c.text for c in done.choices)
    assert done.usage is not None and 4 <= done.usage.completion_tokens <= 4 * 6
    # Each prompt counts once, however many choices it has.
    alone = [
        sdk.completions.create(model=MODEL, prompt=p, max_tokens=1).usage
        for p in ("Once upon a time", "The sea is")
    ]
    assert done.usage.prompt_tokens == sum(u.prompt_tokens for u in alone if u is not None)
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


def test_completion_echo_stop_seed_and_logprobs(sdk: openai.OpenAI) -> None:
    prompt = "List three colours:"
    echoed = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=6, echo=True, temperature=0)
    assert echoed.choices[0].text.startswith(prompt)

    free = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0).choices[0].text
    assert len(free.split()) > 2, free
    stop = free.split()[1]
    cut = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text

    def sample(seed: int) -> str:
        return (
            sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=1.0, seed=seed)
            .choices[0]
            .text
        )

    assert sample(5) == sample(5)

    lp = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=5, logprobs=2, temperature=0)
    logprobs = lp.choices[0].logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs and logprobs.top_logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs)
    assert all(x <= 0 for x in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    # Greedy decoding picks the most likely token.
    assert max(logprobs.top_logprobs[0].values()) == pytest.approx(logprobs.token_logprobs[0])


# --- chat: tools ---


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_returns_a_valid_call(sdk: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert deltas[0].id and deltas[0].type == "function" and deltas[0].function
        assert deltas[0].function.name == "get_weather"
        assert all(d.index == 0 for d in deltas)
        arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
        reason = chunks[-1].choices[0].finish_reason
    else:
        done = sdk.chat.completions.create(**kwargs)
        message = done.choices[0].message
        assert message.content is None
        assert message.tool_calls and len(message.tool_calls) == 1
        call = message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        assert call.function.name == "get_weather"
        arguments, reason = call.function.arguments, done.choices[0].finish_reason
    assert reason == "tool_calls"
    jsonschema.validate(json.loads(arguments), WEATHER_SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_required_tool_choice_calls_one_of_the_tools(sdk: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK_WEATHER,
        "tools": [WEATHER, TIME],
        "tool_choice": "required",
        "seed": 1,
    }
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert deltas and deltas[0].function and deltas[0].id
        name = deltas[0].function.name
        arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
        reason = chunks[-1].choices[0].finish_reason
    else:
        done = sdk.chat.completions.create(**kwargs)
        calls = done.choices[0].message.tool_calls
        assert calls
        name, arguments, reason = (
            calls[0].function.name,
            calls[0].function.arguments,
            done.choices[0].finish_reason,
        )
    assert reason == "tool_calls"
    schema = {"get_weather": WEATHER_SCHEMA, "get_time": TIME_SCHEMA}[name or ""]
    jsonschema.validate(json.loads(arguments), schema)


@pytest.mark.parametrize("stream", [False, True])
def test_auto_and_none_tool_choice_answer_in_the_openai_shape(sdk: openai.OpenAI, stream: bool) -> None:
    for choice in ("auto", "none"):
        kwargs: dict[str, Any] = {
            "model": MODEL,
            "messages": ASK_WEATHER,
            "tools": [WEATHER],
            "tool_choice": choice,
            "max_tokens": 60,
            "seed": 2,
        }
        if stream:
            chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
            reason = chunks[-1].choices[0].finish_reason
            called = any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            done = sdk.chat.completions.create(**kwargs)
            reason, message = done.choices[0].finish_reason, done.choices[0].message
            called, text = bool(message.tool_calls), message.content or ""
        if called:
            assert choice == "auto" and reason == "tool_calls"
        else:
            assert text and reason in ("stop", "length")


def test_tool_calls_and_tool_results_in_the_history(sdk: openai.OpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        *ASK_WEATHER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
    ]
    done = sdk.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none", max_tokens=30
    )
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")


def test_bad_tool_choice_is_400_naming_it(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(
            model=MODEL,
            messages=ASK_WEATHER,
            tools=[WEATHER],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert _error(info.value)["param"] == "tool_choice"


# --- chat: structured output ---


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["json_object", "json_schema"])
def test_response_format_gives_json_that_validates(sdk: openai.OpenAI, stream: bool, kind: str) -> None:
    fmt: dict[str, Any] = (
        {"type": "json_object"}
        if kind == "json_object"
        else {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": PERSON_SCHEMA, "strict": True},
        }
    )
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Describe a person called Ada who is 36, as JSON."}
    ]
    kwargs: dict[str, Any] = {"model": MODEL, "messages": messages, "response_format": fmt, "seed": 4}
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        done = sdk.chat.completions.create(**kwargs)
        text, reason = done.choices[0].message.content or "", done.choices[0].finish_reason
    assert reason == "stop"
    parsed = json.loads(text)
    assert isinstance(parsed, dict)
    if kind == "json_schema":
        jsonschema.validate(parsed, PERSON_SCHEMA)


# --- chat: logprobs, n ---


@pytest.mark.parametrize("stream", [False, True])
def test_chat_logprobs_and_top_logprobs(sdk: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": HELLO,
        "max_tokens": 6,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        content = [
            t
            for c in chunks
            if c.choices and c.choices[0].logprobs
            for t in c.choices[0].logprobs.content or []
        ]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        done = sdk.chat.completions.create(**kwargs)
        assert done.choices[0].logprobs is not None
        content = done.choices[0].logprobs.content or []
        text = done.choices[0].message.content or ""
    assert len(content) == 6
    assert "".join(t.token for t in content) == text
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].logprob == pytest.approx(t.logprob)  # greedy
        assert t.bytes == list(t.token.encode())


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(sdk: openai.OpenAI, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 8, "n": 3, "seed": 11}
    if stream:
        chunks = list(sdk.chat.completions.create(**kwargs, stream=True))
        texts = [
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices[0].index == i)
            for i in range(3)
        ]
        finishes = [c.choices[0].index for c in chunks if c.choices[0].finish_reason]
        assert sorted(finishes) == [0, 1, 2]
    else:
        done = sdk.chat.completions.create(**kwargs)
        assert [c.index for c in done.choices] == [0, 1, 2]
        texts = [c.message.content or "" for c in done.choices]
        assert done.usage is not None and done.usage.completion_tokens <= 24
    assert all(texts)
    again = sdk.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, n=3, seed=11)
    assert [c.message.content for c in again.choices] == texts


# --- embeddings ---


def test_embeddings_float_and_base64(sdk: openai.OpenAI) -> None:
    texts = ["The cat sat on the mat.", "A kitten rested on a rug.", "Stock markets fell sharply today."]
    # The SDK asks for base64 by default and decodes it; the float answer must be the same vectors.
    b64 = sdk.embeddings.create(model=MODEL, input=texts)
    floats = sdk.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1, 2]
    dim = len(floats.data[0].embedding)
    assert dim > 100 and all(len(d.embedding) == dim for d in b64.data)
    for a, b in zip(b64.data, floats.data, strict=True):
        assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0

    def cos(i: int, j: int) -> float:
        return sum(x * y for x, y in zip(floats.data[i].embedding, floats.data[j].embedding, strict=True))

    assert cos(0, 0) == pytest.approx(1.0, abs=1e-5)  # normalised
    assert cos(0, 1) > cos(0, 2)  # the cat is nearer the kitten than the stock market


def test_embeddings_of_a_string_and_of_token_arrays(sdk: openai.OpenAI) -> None:
    one = sdk.embeddings.create(model=MODEL, input="hello world", encoding_format="float")
    assert len(one.data) == 1
    tokens = sdk.embeddings.create(model=MODEL, input=[28120, 905], encoding_format="float")
    assert tokens.usage.prompt_tokens == 2
    several = sdk.embeddings.create(model=MODEL, input=[[28120, 905], [28120]], encoding_format="float")
    assert len(several.data) == 2
    # "hello world" is exactly the tokens 28120, 905 for SmolLM2 (no BOS).
    assert one.data[0].embedding == pytest.approx(tokens.data[0].embedding, abs=1e-5)


def test_embeddings_errors(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=MODEL, input=[])
    assert _error(info.value)["param"] == "input"
    with pytest.raises(openai.NotFoundError):
        sdk.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as info:
        sdk.embeddings.create(model=MODEL, input=[[10**9]], encoding_format="float")
    assert _error(info.value)["param"] == "input"


# --- keys, unknown fields ---


def test_requests_without_the_key_are_401(conformance_fleet: Fleet) -> None:
    with openai.OpenAI(
        base_url=f"{conformance_fleet.base_url}/v1", api_key="wrong", max_retries=0
    ) as anonymous:
        with pytest.raises(openai.AuthenticationError) as info:
            anonymous.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
        assert _error(info.value)["code"] == "invalid_api_key"
        assert "wrong" not in info.value.response.text
        with pytest.raises(openai.AuthenticationError):
            anonymous.models.list()


def test_unknown_request_fields_are_accepted(sdk: openai.OpenAI) -> None:
    done = sdk.chat.completions.create(
        model=MODEL, messages=HELLO, max_tokens=3, extra_body={"a_field_from_the_future": {"x": 1}}
    )
    assert done.choices[0].message.content is not None
    out = sdk.completions.create(model=MODEL, prompt="Hi", max_tokens=2, extra_body={"another_new_one": True})
    assert out.choices[0].text is not None
