"""A managed key's limits, counted in Redis so that they hold across every API process.

Requests and tokens are counted per minute (fixed windows on the API's wall clock, ``rate_limit_window``
long, each counter expiring with its window), tokens also per calendar month (UTC), and requests in flight.
A request is admitted in one Lua step that checks every limit and counts it, so two processes cannot both
take the last request of a minute. Tokens are counted when a request ends, as used (``spent``): a request is
refused once the minute's (or the month's) tokens are spent, so the tokens limit can be passed by what the
requests in flight at that moment use, no more (``max_concurrent`` bounds that).

Every answer to a limited key carries OpenAI's ``x-ratelimit-limit-*``, ``x-ratelimit-remaining-*`` and
``x-ratelimit-reset-*`` headers for requests and tokens (on ``/v1/messages``, Anthropic's
``anthropic-ratelimit-{requests,tokens}-{limit,remaining,reset}``, whose reset is an RFC 3339 time); a refusal
is a 429 with ``Retry-After``: the seconds until the window that was full starts over.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aredis

from api import errors
from api.keystore import ManagedKey
from queueing import keys

# KEYS: requests this minute, tokens this minute, tokens this month, requests in flight. ARGV: rpm, tpm,
# monthly tokens, max concurrent (0: none), ms the minute's counters live, s the in-flight counter lives, 1 to
# admit (check and count) or 0 to read. Returns {admitted, what was full, requests, tokens, month, in flight}.
ADMIT = """
local rpm, tpm, monthly, most = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local req = tonumber(redis.call('GET', KEYS[1]) or '0')
local tok = tonumber(redis.call('GET', KEYS[2]) or '0')
local month = tonumber(redis.call('GET', KEYS[3]) or '0')
local inflight = tonumber(redis.call('GET', KEYS[4]) or '0')
if ARGV[7] == '1' then
  local full = ''
  if rpm > 0 and req >= rpm then full = 'requests'
  elseif tpm > 0 and tok >= tpm then full = 'tokens'
  elseif monthly > 0 and month >= monthly then full = 'month'
  elseif most > 0 and inflight >= most then full = 'concurrent' end
  if full ~= '' then return {0, full, req, tok, month, inflight} end
  req = redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[5])
  if most > 0 then
    inflight = redis.call('INCR', KEYS[4])
    redis.call('EXPIRE', KEYS[4], ARGV[6])
  end
end
return {1, '', req, tok, month, inflight}
"""


# KEYS: requests in flight.
RELEASE = """
if redis.call('DECR', KEYS[1]) < 0 then redis.call('DEL', KEYS[1]) end
return 1
"""


@dataclass
class Admission:
    """What admitting (or looking at) a request found: whether it may go on, and its headers."""

    admitted: bool
    headers: dict[str, str] = field(default_factory=dict)
    error: errors.ApiError | None = None
    # Whether it holds one of the key's in-flight places, to give back when it ends.
    holds: bool = False


def _reset(seconds: float) -> str:
    # OpenAI's format: "1s", "6m0s", "20ms"; whole seconds are enough for minute windows.
    s = max(1, math.ceil(seconds))
    return f"{s // 60}m{s % 60}s" if s >= 60 else f"{s}s"


def _headers(anthropic: bool, kind: str, limit: int, used: int, ends: float, now: float) -> dict[str, str]:
    """One limit's three headers in the client's dialect: OpenAI's ``x-ratelimit-*-requests`` with the time
    left (``6m0s``), or Anthropic's ``anthropic-ratelimit-requests-*`` with the time it resets at."""
    remaining = str(max(0, limit - used))
    if anthropic:
        at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(ends)))
        name = f"anthropic-ratelimit-{kind}"
        return {f"{name}-limit": str(limit), f"{name}-remaining": remaining, f"{name}-reset": at}
    return {
        f"x-ratelimit-limit-{kind}": str(limit),
        f"x-ratelimit-remaining-{kind}": remaining,
        f"x-ratelimit-reset-{kind}": _reset(ends - now),
    }


class Limiter:
    def __init__(self, client: aredis.Redis, inflight_ttl: float, window: float = 60.0) -> None:
        self._r = client
        self._admit = client.register_script(ADMIT)
        self._release = client.register_script(RELEASE)
        self._inflight_ttl = max(1, int(inflight_ttl))
        self._window = window

    async def admit(self, key: ManagedKey, count: bool, anthropic: bool = False) -> Admission:
        """Check and count one request of ``key`` (``count``), or only read its counters for the headers
        (Anthropic's where ``anthropic``)."""
        now = time.time()
        window = int(now // self._window)
        ks = [
            keys.rate_window_key(key.digest, "requests", window),
            keys.rate_window_key(key.digest, "tokens", window),
            _month_key(key, now),
            keys.rate_inflight_key(key.digest),
        ]
        args = [
            key.rpm or 0,
            key.tpm or 0,
            key.monthly_tokens or 0,
            key.max_concurrent or 0,
            int(self._window * 2000),
            self._inflight_ttl,
            1 if count else 0,
        ]
        found = cast(list[object], await self._admit(keys=ks, args=args))
        admitted, full = bool(found[0]), _text(found[1])
        req, tok, used_month, inflight = (int(cast(int, v)) for v in found[2:6])
        ends = (window + 1) * self._window
        reset = ends - now
        headers: dict[str, str] = {}
        if key.rpm is not None:
            headers.update(_headers(anthropic, "requests", key.rpm, req, ends, now))
        if key.tpm is not None:
            headers.update(_headers(anthropic, "tokens", key.tpm, tok, ends, now))
        if admitted:
            return Admission(True, headers, holds=count and key.max_concurrent is not None)
        retry = {"requests": reset, "tokens": reset, "month": _month_left(now), "concurrent": 1.0}[full]
        headers["retry-after"] = str(max(1, math.ceil(retry)))
        return Admission(False, headers, _refusal(key, full, req, tok, used_month, inflight, retry))

    async def spent(self, key: ManagedKey, tokens: int) -> None:
        """Count the tokens a request of ``key`` used, in this minute and this month."""
        if tokens <= 0 or (key.tpm is None and key.monthly_tokens is None):
            return
        now = time.time()
        minute = keys.rate_window_key(key.digest, "tokens", int(now // self._window))
        month = _month_key(key, now)
        async with self._r.pipeline(transaction=False) as pipe:
            pipe.incrby(minute, tokens)
            pipe.pexpire(minute, int(self._window * 2000))
            pipe.incrby(month, tokens)
            pipe.expire(month, 32 * 86400)
            await pipe.execute()

    async def release(self, key: ManagedKey) -> None:
        """Give back the in-flight place an admitted request of ``key`` held (never below 0: a count that
        expired under a long request starts over from 0, not from -1)."""
        await self._release(keys=[keys.rate_inflight_key(key.digest)])


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _month_key(key: ManagedKey, now: float) -> str:
    """The key's token count of the calendar month (UTC) ``now`` falls in."""
    return keys.rate_window_key(key.digest, "month", int(time.strftime("%Y%m", time.gmtime(now))))


def _month_left(now: float) -> float:
    t = time.gmtime(now)
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0)) - now


def _refusal(
    key: ManagedKey, full: str, req: int, tok: int, month: int, inflight: int, retry: float
) -> errors.ApiError:
    wait = f"Please try again in {max(1, math.ceil(retry))}s."
    reached = f"Rate limit reached for key '{key.name}' on"
    if full == "requests":
        message = f"{reached} requests per min (RPM): Limit {key.rpm}, Used {req}. {wait}"
        return errors.ApiError(429, message, "requests", None, "rate_limit_exceeded")
    if full == "tokens":
        message = f"{reached} tokens per min (TPM): Limit {key.tpm}, Used {tok}. {wait}"
        return errors.ApiError(429, message, "tokens", None, "rate_limit_exceeded")
    if full == "month":
        message = (
            f"Key '{key.name}' has used its monthly budget of {key.monthly_tokens} tokens ({month} used). "
            "It starts over on the first of next month (UTC)."
        )
        return errors.ApiError(429, message, "insufficient_quota", None, "insufficient_quota")
    message = f"Key '{key.name}' has {inflight} requests in flight, its limit ({key.max_concurrent}). {wait}"
    return errors.ApiError(429, message, "requests", None, "rate_limit_exceeded")
