"""langchain-openai's ChatOpenAI against the fleet: plain and streamed chat, ``bind_tools`` and
``with_structured_output`` (both the JSON-schema and the function-calling methods)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from pydantic import BaseModel

from tests.conformance.conftest import MODEL, USER_KEY
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e


@tool
def get_weather(city: str, unit: str = "celsius") -> str:
    """Current weather in a city."""
    return f"21 degrees {unit} in {city}"


class Person(BaseModel):
    name: str
    age: int


@pytest.fixture
def llm(conformance_fleet: Fleet) -> Iterator[ChatOpenAI]:
    yield ChatOpenAI(
        model=MODEL,
        base_url=f"{conformance_fleet.base_url}/v1",
        api_key=USER_KEY,
        max_retries=0,
        timeout=120,
        temperature=0.7,
        seed=3,
        max_completion_tokens=60,
    )


def test_invoke_and_stream(llm: ChatOpenAI) -> None:
    reply = llm.invoke([HumanMessage("Say hello.")])
    assert isinstance(reply, AIMessage) and isinstance(reply.content, str) and reply.content
    pieces = list(llm.stream([HumanMessage("Say hello.")]))
    assert all(isinstance(p, AIMessageChunk) for p in pieces)
    assert len(pieces) > 2 and "".join(str(p.content) for p in pieces).strip()


@pytest.mark.parametrize("stream", [False, True])
def test_bind_tools_with_a_named_tool_choice(llm: ChatOpenAI, stream: bool) -> None:
    bound = llm.bind_tools([get_weather], tool_choice="get_weather")
    question = [HumanMessage("What is the weather in Paris?")]
    if stream:
        total: AIMessageChunk | None = None
        for piece in bound.stream(question):
            assert isinstance(piece, AIMessageChunk)
            total = piece if total is None else total + piece
        assert total is not None
        calls = total.tool_calls
    else:
        reply = bound.invoke(question)
        assert isinstance(reply, AIMessage)
        calls = reply.tool_calls
    assert len(calls) == 1 and calls[0]["name"] == "get_weather"
    args = calls[0]["args"]
    assert isinstance(args, dict) and isinstance(args["city"], str)
    # The call runs, and its result goes back to the model as a tool message.
    result = get_weather.invoke(args)
    follow = llm.bind_tools([get_weather]).invoke(
        [
            *question,
            AIMessage(content="", tool_calls=calls),
            ToolMessage(content=result, tool_call_id=calls[0]["id"] or ""),
        ]
    )
    assert isinstance(follow, AIMessage)


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_with_structured_output(llm: ChatOpenAI, method: str) -> None:
    structured = llm.with_structured_output(Person, method=method)  # type: ignore[arg-type]
    person = structured.invoke("Ada is 36 years old. Return her name and age as JSON.")
    assert isinstance(person, Person)


@pytest.fixture
def responses_llm(llm: ChatOpenAI) -> ChatOpenAI:
    return llm.model_copy(update={"use_responses_api": True, "seed": None})


def test_responses_api_bind_tools_and_structured_output(responses_llm: ChatOpenAI) -> None:
    """The same client on the Responses API: a named tool call, then structured output."""
    question = [HumanMessage("What is the weather in Paris?")]
    reply = responses_llm.bind_tools([get_weather], tool_choice="get_weather").invoke(question)
    assert isinstance(reply, AIMessage)
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "get_weather"
    assert isinstance(reply.tool_calls[0]["args"]["city"], str)
    person = responses_llm.with_structured_output(Person).invoke("Ada is 36 years old. Name and age?")
    assert isinstance(person, Person)
