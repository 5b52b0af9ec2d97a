"""A conversation as every chat-like protocol hands it to the serving core: turns, tools, the tool choice and
the output format, with no protocol's wire shape left in it.

Chat completions, the Responses API and Anthropic Messages each convert their request into a
``Conversation`` (api/adapters/); ``api.serving.structured`` turns it into what the engine is told and what
its output is constrained to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Role = Literal["system", "developer", "user", "assistant", "tool"]


@dataclass(frozen=True)
class Call:
    """A function call the model made (or made in an earlier turn): its name and arguments as JSON text."""

    name: str
    arguments: str


@dataclass(frozen=True)
class Turn:
    role: Role
    text: str
    # On an assistant turn: the calls it made, shown to the model in the format it is asked to call in.
    calls: list[Call] = field(default_factory=list)


@dataclass(frozen=True)
class Function:
    name: str
    description: str | None = None
    # JSON schema of the arguments; None: any object.
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class Named:
    """A tool choice that forces one function."""

    name: str


ToolChoice = Literal["none", "auto", "required"] | Named


@dataclass(frozen=True)
class OutputFormat:
    """``json_object`` (any JSON object) or ``json_schema`` (``schema``); plain text needs none."""

    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Conversation:
    turns: list[Turn]
    tools: list[Function] = field(default_factory=list)
    # None: `auto` when there are tools, else `none` (what every protocol defaults to).
    tool_choice: ToolChoice | None = None
    output: OutputFormat | None = None
    # The request's own names of these fields, for the `param` of an error about them.
    tool_choice_param: str = "tool_choice"
    output_param: str = "response_format"
