"""API keys managed through the admin API (``/v1/system/keys``, ``inferq keys``): each with a name and a
policy, stored in Redis by the key's SHA-256 (the key itself is shown once, at creation, and never stored).

Every API process reads a key's policy from Redis and keeps it for ``CACHE_SECONDS``: a key revoked on one
process is refused by every process within that time, at the cost of one HGET per key and half second.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import redis.asyncio as aredis
from pydantic import BaseModel, Field

from queueing import keys

# How long a process trusts what it read of a key: the most a revocation takes to reach every process.
CACHE_SECONDS = 0.5
KEY_PREFIX = "sk-inferq-"


def digest(key: str | bytes) -> str:
    """What a key is stored and counted under; ``api.auth.owner_of`` is its first 32 characters."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


# The managed key a request presented, if it did (set by api/auth.py): the models it may call, the tokens it
# spends.
requested_key: ContextVar[ManagedKey | None] = ContextVar("requested_key", default=None)


class KeyLimits(BaseModel):
    """What a key may do; every limit is optional (None: unlimited)."""

    rpm: int | None = Field(None, ge=1, description="Requests per minute.")
    tpm: int | None = Field(None, ge=1, description="Tokens (prompt and completion) per minute.")
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    monthly_tokens: int | None = Field(None, ge=1, description="Tokens per calendar month (UTC).")
    models: list[str] | None = Field(None, description="The models it may call; None: every model.")
    max_priority: Literal["low", "normal", "high"] | None = Field(
        None, description="The highest priority class it may use (api/priority.py); None: high."
    )


class KeyCreate(KeyLimits):
    name: str = Field(min_length=1, max_length=128, description="A label, shown in listings and metrics.")


class ManagedKey(KeyCreate):
    """A stored key: its policy, never the key."""

    id: str = Field(description="The key's handle for listing and revoking: the start of its digest.")
    created_at: int
    # Filled from the hash field it is stored under.
    digest: str = Field("", exclude=True)


class CreatedKey(ManagedKey):
    """What creating a key answers: the only time the key itself is shown."""

    key: str


@dataclass
class _Cached:
    found: ManagedKey | None
    until: float


class KeyStore:
    def __init__(self, client: aredis.Redis) -> None:
        self._r = client
        self._cache: dict[str, _Cached] = {}
        # Whether any key is managed, and until when that answer is trusted.
        self._any = (False, -1.0)

    async def create(self, request: KeyCreate) -> CreatedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        d = digest(key)
        now = int(time.time())
        managed = ManagedKey(**request.model_dump(), id=f"key_{d[:16]}", created_at=now, digest=d)
        async with self._r.pipeline(transaction=True) as pipe:
            pipe.hset(keys.API_KEYS, d, managed.model_dump_json())
            pipe.set(keys.API_KEYS_REQUIRED, 1)
            await pipe.execute()
        self._any = (True, time.monotonic() + CACHE_SECONDS)
        return CreatedKey(**managed.model_dump(), digest=d, key=key)

    async def list(self) -> list[ManagedKey]:
        raw = await self._r.hgetall(keys.API_KEYS)
        found = [_load(d, v) for d, v in raw.items()]
        return sorted(found, key=lambda k: (k.created_at, k.id))

    async def revoke(self, key_id: str) -> ManagedKey | None:
        for managed in await self.list():
            if managed.id == key_id:
                await self._r.hdel(keys.API_KEYS, managed.digest)
                self._cache.pop(managed.digest, None)
                return managed
        return None

    async def lookup(self, key_digest: str) -> ManagedKey | None:
        """The key's policy, or None if no such key is managed (or it was revoked)."""
        now = time.monotonic()
        cached = self._cache.get(key_digest)
        if cached is not None and cached.until > now:
            return cached.found
        raw = await self._r.hget(keys.API_KEYS, key_digest)
        found = None if raw is None else _load(key_digest, raw)
        if len(self._cache) > 10_000:
            self._cache.clear()  # bounded: presented keys that are not managed would otherwise pile up
        self._cache[key_digest] = _Cached(found, now + CACHE_SECONDS)
        return found

    async def any(self) -> bool:
        """Whether a key was ever managed: from the first one on, every request needs a key (also once every
        key was revoked: an admin who revokes the last key does not mean to open the API)."""
        now = time.monotonic()
        if self._any[1] <= now:
            self._any = (bool(await self._r.exists(keys.API_KEYS_REQUIRED)), now + CACHE_SECONDS)
        return self._any[0]


def _load(key_digest: str | bytes, raw: str | bytes) -> ManagedKey:
    d = key_digest.decode() if isinstance(key_digest, bytes) else key_digest
    return ManagedKey.model_validate_json(raw).model_copy(update={"digest": d})
