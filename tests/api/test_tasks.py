"""A background loop stops at shutdown even when a library swallowed the first cancellation."""

from __future__ import annotations

import asyncio

import redis

from api.tasks import cancel_and_wait


def test_a_loop_that_swallowed_its_cancellation_is_cancelled_again() -> None:
    passes: list[str] = []

    async def loop() -> None:
        # As a client library does when a cancel races its own timeout: the cancellation comes out as the
        # library's error, which the loop logs and goes on from.
        swallowed = False
        while True:
            try:
                try:
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed = True
                    raise redis.TimeoutError("timed out") from None
            except redis.RedisError:
                passes.append("failed pass")

    async def main() -> bool:
        task = asyncio.create_task(loop(), name="looping")
        await asyncio.sleep(0.01)
        # asyncio.wait, not wait_for: a timeout here must not cancel the loop a second time itself.
        closing = asyncio.create_task(cancel_and_wait(task, grace=0.1))
        done, _ = await asyncio.wait({closing}, timeout=2)
        for t in (closing, task):
            t.cancel()
        await asyncio.gather(closing, task, return_exceptions=True)
        return bool(done)

    assert asyncio.run(main())
    assert passes == ["failed pass"]  # the first cancel was swallowed: a plain cancel-and-await hangs here
