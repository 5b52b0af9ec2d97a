"""Responses API items as the conversation the model sees: messages, earlier function calls and their
outputs, and a compaction (the summary ``/v1/responses/compact`` wrote) in place of what it replaced."""

from __future__ import annotations

import base64
import json
from typing import Any

from pydantic import TypeAdapter

from api import errors
from api.protocol.responses import (
    CompactionItem,
    FunctionCallItem,
    FunctionCallOutputItem,
    InputItem,
    InputMessage,
    InputTextContent,
    StoredItem,
    StoredMessage,
)
from api.responses.store import StoredResponse
from api.serving.conversation import Call, Turn

_stored: TypeAdapter[StoredItem] = TypeAdapter(StoredItem)
# What a compaction's opaque content holds; versioned, so a later format can still read old ones.
COMPACTION_PREFIX = "inferq-compaction-v1:"


def context_items(previous: StoredResponse | None, new: str | list[InputItem]) -> list[dict[str, Any]]:
    """Every item the model sees, each with an id: the previous response's conversation and output (when
    continuing one), then this request's input."""
    prior: list[dict[str, Any]] = []
    if previous is not None:
        prior = [*previous.context, *(i.model_dump(mode="json") for i in previous.response.output)]
    if isinstance(new, str):
        items: list[StoredItem] = [StoredMessage(role="user", content=[InputTextContent(text=new)])]
    else:
        items = [item.to_item() for item in new]
    return [*prior, *(i.model_dump(mode="json") for i in items)]


def summary_of(item: CompactionItem) -> str:
    try:
        raw = base64.b64decode(item.encrypted_content, validate=True).decode()
    except ValueError:  # not base64 (binascii.Error), not ASCII at all, not UTF-8 once decoded
        raw = ""
    doc = None
    if raw.startswith(COMPACTION_PREFIX):
        try:  # the client sends it back: any text, any depth
            doc = json.loads(raw[len(COMPACTION_PREFIX) :])
        except (ValueError, RecursionError):
            doc = None
    if not isinstance(doc, dict):
        raise errors.invalid_request(
            "This compaction item was not made by this server.", "input", "invalid_encrypted_content"
        )
    return str(doc.get("summary", ""))


def compaction_content(summary: str) -> str:
    """Opaque to clients, as OpenAI's is; base64 of a versioned JSON, not encryption (nothing secret)."""
    return base64.b64encode((COMPACTION_PREFIX + json.dumps({"summary": summary})).encode()).decode()


def turns(context: list[dict[str, Any]]) -> list[Turn]:
    out: list[Turn] = []
    for raw in context:
        item = _stored.validate_python(raw)
        if isinstance(item, StoredMessage):
            out.append(Turn(item.role, InputMessage(role=item.role, content=item.content).text()))
        elif isinstance(item, FunctionCallItem):
            call = Call(item.name, item.arguments)
            if out and out[-1].role == "assistant":
                # Calls the same assistant turn made after (or instead of) its text.
                last = out.pop()
                out.append(Turn("assistant", last.text, [*last.calls, call]))
            else:
                out.append(Turn("assistant", "", [call]))
        elif isinstance(item, FunctionCallOutputItem):
            out.append(Turn("tool", item.output))
        else:
            out.append(Turn("system", f"Summary of the conversation so far: {summary_of(item)}"))
    return out
