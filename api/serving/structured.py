"""Tools and structured output on any engine: what the model is told, what its output is constrained to, and
how its text becomes ``tool_calls``.

Engines see only neutral fields: plain role/content messages (tool definitions rendered into the system
message, earlier tool calls into text) and ``json_schema``. A forced call (``required`` or a named function)
is a JSON schema, so engines with constrained decoding always produce arguments that validate; under ``auto``
the model decides, and text that parses as a call of a known tool becomes one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from api import errors
from api.serving.conversation import Call, Conversation, Function, Named, Turn
from queueing.jobs import ChatMessage

Mode = Literal["text", "auto", "required", "named"]
# Under `auto` a reply that starts like this may be a tool call, so it is held back until it is complete.
_CALL_START = re.compile(r"^\s*(\{|```|<tool_call>)")
_FENCES = re.compile(r"^\s*(```(json)?|<tool_call>)\s*|\s*(```|</tool_call>)\s*$")

_CALL_FORMAT = 'reply with only a JSON object {"name": <function name>, "arguments": <arguments object>}'


@dataclass(frozen=True)
class Plan:
    mode: Mode
    messages: list[ChatMessage]
    json_schema: dict[str, Any] | None
    tools: dict[str, Function]
    function: str | None = None  # the function a `named` plan calls

    def may_call(self, text_so_far: str) -> bool:
        """Whether streamed text must be held back because it may turn out to be a tool call."""
        if self.mode == "auto":
            return bool(_CALL_START.match(text_so_far)) or not text_so_far.strip()
        return self.mode in ("required", "named")


def _parameters(tool: Function) -> dict[str, Any]:
    return tool.parameters or {"type": "object", "properties": {}}


def _describe(tools: list[Function]) -> str:
    specs = [
        {"name": t.name, "description": t.description or "", "parameters": _parameters(t)} for t in tools
    ]
    return json.dumps(specs)


def _instructions(conv: Conversation, mode: Mode, function: str | None) -> str | None:
    tools = conv.tools
    if mode == "named":
        tool = next(t for t in tools if t.name == function)
        return (
            f"Call the function `{function}` ({tool.description or 'no description'}). Reply with "
            f"only its arguments as a JSON object matching this schema: {json.dumps(_parameters(tool))}"
        )
    if mode == "required":
        return f"You must call one of these functions: {_describe(tools)}\nTo call one, {_CALL_FORMAT}."
    if mode == "auto":
        return (
            f"You can call these functions: {_describe(tools)}\nTo call one, {_CALL_FORMAT}. "
            "Otherwise answer in plain text."
        )
    fmt = conv.output
    if fmt is not None and fmt.kind == "json_schema" and fmt.schema:
        return f"Reply with only a JSON object matching this schema: {json.dumps(fmt.schema)}"
    if fmt is not None:
        return "Reply with only a JSON object."
    return None


def _history(turn: Turn) -> ChatMessage:
    text = turn.text
    if turn.role == "assistant" and turn.calls:
        # Earlier calls are shown in the format the model is asked to call in.
        calls = [json.dumps({"name": c.name, "arguments": _loads_or_text(c.arguments)}) for c in turn.calls]
        text = "\n".join([text, *calls]) if text else "\n".join(calls)
    return ChatMessage(role=turn.role, content=text)


def _loads_or_text(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):  # a string the client sent: any depth reaches here
        return arguments


def _with_system(messages: list[ChatMessage], note: str | None) -> list[ChatMessage]:
    if note is None:
        return messages
    if messages and messages[0].role in ("system", "developer"):
        first = messages[0]
        return [ChatMessage(role=first.role, content=f"{first.content}\n\n{note}"), *messages[1:]]
    return [ChatMessage(role="system", content=note), *messages]


def _response_schema(conv: Conversation) -> dict[str, Any] | None:
    fmt = conv.output
    if fmt is None:
        return None
    return fmt.schema if fmt.kind == "json_schema" and fmt.schema else {"type": "object"}


def _check(conv: Conversation, tools: dict[str, Function]) -> None:
    choice, param = conv.tool_choice, conv.tool_choice_param
    if choice == "required" and not tools:
        raise errors.invalid_request(f"{param} `required` needs `tools`.", param, "invalid_value")
    if isinstance(choice, Named) and choice.name not in tools:
        raise errors.invalid_request(
            f"{param} names `{choice.name}`, which is not in `tools`.", param, "invalid_value"
        )


def plan(conv: Conversation) -> Plan:
    tools = {t.name: t for t in conv.tools}
    _check(conv, tools)
    choice = conv.tool_choice if conv.tool_choice is not None else ("auto" if tools else "none")
    function: str | None = None
    schema: dict[str, Any] | None
    if not tools or choice == "none":
        mode: Mode = "text"
        schema = _response_schema(conv)
    elif choice == "auto":
        mode, schema = "auto", _response_schema(conv)
    elif choice == "required":
        mode = "required"
        schema = {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"name": {"const": name}, "arguments": _parameters(tool)},
                    "required": ["name", "arguments"],
                }
                for name, tool in tools.items()
            ]
        }
    else:
        assert isinstance(choice, Named)
        mode, function = "named", choice.name
        schema = _parameters(tools[function])
    messages = [_history(t) for t in conv.turns]
    return Plan(
        mode=mode,
        messages=_with_system(messages, _instructions(conv, mode, function)),
        json_schema=schema,
        tools=tools if mode != "text" else {},
        function=function,
    )


def tool_call(plan: Plan, text: str) -> Call | None:
    """The tool call the output makes, or None when it is plain content."""
    if plan.mode == "named":
        assert plan.function is not None
        # The output is the arguments themselves (valid JSON when the engine constrained it).
        return Call(name=plan.function, arguments=text.strip())
    if plan.mode == "text":
        return None
    try:
        parsed = json.loads(_FENCES.sub("", text))
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict) or parsed.get("name") not in plan.tools:
        return None
    arguments = parsed.get("arguments", parsed.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return Call(name=parsed["name"], arguments=json.dumps(arguments))
