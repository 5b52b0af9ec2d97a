"""Following a job through ``JobRun`` over events already queued on its subscription: no Redis is looked at
(every event is there before the run starts)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from api.jobrun import JobRun
from api.jobs import Dispatcher, Limits
from api.streams import Subscription
from queueing import events
from queueing.jobs import Job


def followed(job: Job, queued: list[events.AnyEvent], **options: Any) -> list[events.Event]:
    """What a ``JobRun`` of ``job`` (``options``: ``merge_deltas``, ``times``...) yields for ``queued``."""

    async def main() -> list[events.Event]:
        sub = Subscription("c", maxsize=64)
        for e in queued:
            sub.queue.put_nowait(events.encode(e).encode())
        run = JobRun(cast(Dispatcher, None), job, sub, None, Limits(5, 5, 0.5), **options)
        out: list[events.Event] = [await run.start()]
        async for e in run.rest():
            out.append(e)
        return out

    return asyncio.run(main())
