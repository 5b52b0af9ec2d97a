"""A request's priority class: ``low``, ``normal`` (the default) or ``high``, above batch lines.

Chosen by the ``x-inferq-priority`` header (any protocol), else by OpenAI's ``service_tier`` (``flex`` is
low, ``priority`` is high), and capped by the key's ``max_priority``
(api/keystore.py). A higher class is served first from the model's queue (queueing.keys.MESSAGE_PRIORITY),
and a running job of a lower class gives its slot up to it (workers/preempt.py).
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Literal

from api import errors
from api.keystore import requested_key
from api.protocol.base import ServiceTier
from queueing.jobs import PRIORITY_ORDER, Priority

PRIORITY_HEADER = "x-inferq-priority"
Class = Literal["low", "normal", "high"]
CLASSES: dict[str, Priority] = {"low": "low", "normal": "interactive", "high": "high"}
TIERS: dict[str, Priority] = {"flex": "low", "priority": "high"}
# The ``service_tier`` an OpenAI answer reports for the class its request ran in (batch lines: default).
SERVED: dict[Priority, ServiceTier] = {"low": "flex", "high": "priority"}

# The header's class, if the request named one (set per request in api/app.py).
requested_class: ContextVar[Priority | None] = ContextVar("requested_class", default=None)
# The body's service tier's class, if it maps to one (set by the protocol adapters).
requested_tier: ContextVar[Priority | None] = ContextVar("requested_tier", default=None)


def parse_header(value: str | None) -> Priority | None:
    if value is None:
        return None
    found = CLASSES.get(value.strip().lower())
    if found is None:
        raise errors.invalid_request(
            f"Unknown priority class {value!r} in the {PRIORITY_HEADER} header; use low, normal or high.",
            PRIORITY_HEADER,
            "invalid_value",
        )
    return found


def ask_tier(service_tier: str | None) -> None:
    """A request body's ``service_tier``: ``flex`` asks for the low class, ``priority`` for the high one."""
    requested_tier.set(TIERS.get(service_tier or ""))


def served_tier(cls: Priority) -> ServiceTier:
    """What OpenAI's answers say in ``service_tier`` for a request whose jobs ran in ``cls``: ``flex`` for
    the low class, ``priority`` for the high one, ``default`` otherwise, however the class was chosen (the
    header, the body's tier, the key's cap)."""
    return SERVED.get(cls, "default")


def queued_in(asked: Priority) -> Priority:
    """The class a job run as ``asked`` (``RunOptions.priority``) queues in: an interactive request's is the
    one it asked for, at most its key's; a batch line's stays batch."""
    return effective() if asked == "interactive" else asked


def effective() -> Priority:
    """The class this request's jobs queue in: the one it asked for, at most its key's."""
    asked = requested_class.get() or requested_tier.get() or "interactive"
    key = requested_key.get()
    if key is None or key.max_priority is None:
        return asked
    cap = CLASSES[key.max_priority]
    return max(asked, cap, key=PRIORITY_ORDER.index)
