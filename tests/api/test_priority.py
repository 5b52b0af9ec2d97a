"""A request's priority class (api/priority.py): the header, else OpenAI's service tier, capped by its key."""

from __future__ import annotations

import contextvars

import pytest

from api import errors, priority
from api.keystore import ManagedKey, requested_key


def effective(header: str | None, tier: str | None, cap: str | None) -> str:
    def run() -> str:
        priority.requested_class.set(priority.parse_header(header))
        priority.ask_tier(tier)
        if cap is not None:
            requested_key.set(ManagedKey(name="k", id="key_1", created_at=0, max_priority=cap))
        return priority.effective()

    return contextvars.copy_context().run(run)


@pytest.mark.parametrize(
    ("header", "tier", "cap", "expected"),
    [
        (None, None, None, "interactive"),
        ("high", None, None, "high"),
        ("LOW", None, None, "low"),
        (None, "flex", None, "low"),
        (None, "priority", None, "high"),
        (None, "default", None, "interactive"),
        ("normal", "priority", None, "interactive"),  # the header wins
        ("high", None, "normal", "interactive"),  # capped by the key
        (None, "priority", "low", "low"),
        ("low", None, "normal", "low"),  # a cap never raises a class
    ],
)
def test_the_class_a_request_queues_in(
    header: str | None, tier: str | None, cap: str | None, expected: str
) -> None:
    assert effective(header, tier, cap) == expected


def test_an_unknown_class_is_a_400_naming_the_header() -> None:
    with pytest.raises(errors.ApiError) as caught:
        priority.parse_header("urgent")
    assert caught.value.status == 400 and caught.value.param == priority.PRIORITY_HEADER


@pytest.mark.parametrize(
    ("header", "asked", "expected"),
    [
        (None, "interactive", "default"),
        ("low", "interactive", "flex"),
        ("high", "interactive", "priority"),
        ("high", "batch", "default"),  # a batch line runs as one, whatever its context
    ],
)
def test_the_service_tier_an_answer_reports(header: str | None, asked: str, expected: str) -> None:
    def run() -> str:
        priority.requested_class.set(priority.parse_header(header))
        return priority.served_tier(priority.queued_in(asked))  # type: ignore[arg-type]

    assert contextvars.copy_context().run(run) == expected
