"""The fan-out helper: one failing job cancels its siblings before the error is raised."""

from __future__ import annotations

import asyncio

import pytest

from api.serving.fanout import gather_or_cancel


def test_results_in_order() -> None:
    async def value(v: int, wait: float) -> int:
        await asyncio.sleep(wait)
        return v

    assert asyncio.run(gather_or_cancel(value(1, 0.02), value(2, 0.0))) == [1, 2]


def test_first_error_cancels_and_awaits_the_others() -> None:
    ended: list[str] = []

    async def slow() -> int:
        try:
            await asyncio.sleep(10)
        finally:
            ended.append("slow")
        return 0

    async def boom() -> int:
        await asyncio.sleep(0.01)
        raise ValueError("boom")

    async def go() -> None:
        with pytest.raises(ValueError, match="boom"):
            await gather_or_cancel(slow(), boom())
        # The sibling has finished by the time the error arrives, not some time later.
        assert ended == ["slow"]

    asyncio.run(go())
