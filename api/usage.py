"""The usage ledger: per key, per model, per day (UTC), the requests, errors and tokens, as the clients were
told them (a request's ``usage``: a prompt counted once however many choices it has).

Counted when a request ends (``api.serving.core``), in one Redis hash per day that every API process adds
to, so ``GET /v1/system/usage`` (``inferq usage``) reads the fleet's totals from any process; Prometheus
counters labelled by the key's name (never the key) count what this process served. A batch's lines count to
the key that created the batch. Streams that ended without their usage (the client left, an error) count as
a request (an error), with no tokens.
"""

from __future__ import annotations

import datetime
import time
from contextvars import ContextVar
from dataclasses import dataclass

import redis.asyncio as aredis
from prometheus_client import Counter
from pydantic import BaseModel

from api.metrics import REGISTRY
from queueing import keys

# Kept long enough for a monthly bill.
RETENTION_DAYS = 400
FIELDS = ("requests", "errors", "prompt_tokens", "cached_tokens", "completion_tokens")

KEY_REQUESTS = Counter(
    "inferq_key_requests",
    "Requests by managed key (its name), model and outcome.",
    ["key", "model", "outcome"],
    registry=REGISTRY,
)
KEY_TOKENS = Counter(
    "inferq_key_tokens",
    "Tokens by managed key (its name), model and kind (prompt, cached, completion).",
    ["key", "model", "kind"],
    registry=REGISTRY,
)


@dataclass(frozen=True)
class Account:
    """Whom a request counts to: a managed key's id and name, another key's owner digest, or nobody."""

    id: str
    name: str


ANONYMOUS = Account("anonymous", "anonymous")
# Set per request by api/auth.py, and per batch by its driver (a line counts to the batch's creator).
requested_account: ContextVar[Account] = ContextVar("requested_account", default=ANONYMOUS)


class UsageRow(BaseModel):
    date: str
    key_id: str
    key_name: str
    model: str
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0


class UsageList(BaseModel):
    object: str = "list"
    data: list[UsageRow]


def today(now: float | None = None) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(time.time() if now is None else now))


class UsageLedger:
    def __init__(self, client: aredis.Redis) -> None:
        self._r = client

    async def record(
        self, account: Account, model: str, prompt: int, cached: int, completion: int, ok: bool
    ) -> None:
        outcome = "ok" if ok else "error"
        KEY_REQUESTS.labels(account.name, model, outcome).inc()
        for kind, n in (("prompt", prompt), ("cached", cached), ("completion", completion)):
            if n:
                KEY_TOKENS.labels(account.name, model, kind).inc(n)
        key = keys.usage_day_key(today())
        # One hash per day; a field per account, model and count ("<id>\t<name>\t<model>\t<count>").
        base = f"{account.id}\t{account.name}\t{model}\t"
        # Each HINCRBY is atomic on its own: one round trip, no transaction needed.
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.hincrby(key, base + "requests", 1)
            if not ok:
                pipe.hincrby(key, base + "errors", 1)
            tokens = {"prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": completion}
            for name, n in tokens.items():
                if n:
                    pipe.hincrby(key, base + name, n)
            pipe.expire(key, RETENTION_DAYS * 86400)
            await pipe.execute()

    async def read(self, start: datetime.date, end: datetime.date) -> list[UsageRow]:
        """The rows of every day from ``start`` to ``end`` (both included; at most RETENTION_DAYS)."""
        rows: dict[tuple[str, str, str, str], UsageRow] = {}
        days = min((end - start).days + 1, RETENTION_DAYS)
        dates = [(start + datetime.timedelta(days=i)).isoformat() for i in range(max(days, 0))]
        async with self._r.pipeline(transaction=False) as pipe:
            for date in dates:
                pipe.hgetall(keys.usage_day_key(date))
            found = await pipe.execute()
        for date, fields in zip(dates, found, strict=True):
            for raw, value in fields.items():
                # A key's name may hold a tab; its id, the model and the count's name do not.
                key_id, rest = (raw.decode() if isinstance(raw, bytes) else raw).split("\t", 1)
                name, model, what = rest.rsplit("\t", 2)
                new = UsageRow(date=date, key_id=key_id, key_name=name, model=model)
                row = rows.setdefault((date, key_id, name, model), new)
                if what in FIELDS:
                    setattr(row, what, int(value))
        return list(rows.values())
