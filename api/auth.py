"""API keys: an ASGI middleware in front of every route, so routes added later are covered without knowing it.

``INFERQ_API_KEYS`` (a comma list, or a file with one key per line) makes every route but health and metrics
need ``Authorization: Bearer <key>`` (or ``x-api-key: <key>``, as Anthropic's SDKs send it);
``INFERQ_ADMIN_KEY`` alone may make management writes (every non-GET
route under ``/v1/system/``) and manage keys (``/v1/system/keys``), and also works as a normal key. Keys are
compared in constant time and never logged or echoed.

Keys created through the admin API (api/keystore.py) work alongside: from the first one on, every request
needs a key, and a managed key's limits (api/ratelimit.py) are checked and counted here, before the route.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from api.errors import ApiError, respond
from api.keystore import KeyStore, ManagedKey, digest, requested_key
from api.ratelimit import Admission, Limiter
from api.redis_breaker import RedisBreaker
from api.usage import ANONYMOUS, Account, requested_account
from queueing.settings import Settings

logger = logging.getLogger(__name__)

# Probes and scrapers carry no key.
OPEN_PATHS = frozenset({"/v1/system/health", "/metrics"})
MANAGEMENT_PREFIX = "/v1/system"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Routes only the admin key may use, reads included (when an admin key is set).
ADMIN_ONLY = ("/v1/system/keys", "/v1/system/usage")
# Requests that count against a key's requests per minute: those that run the model.
COUNTED = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses/compact",
        "/v1/messages",
    }
)


def key_of(headers: Mapping[str, str]) -> str | None:
    """The key a request presented, as a string (the middleware checked it already)."""
    auth = headers.get("authorization") or ""
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = headers.get("x-api-key")
    return key.strip() if key else None


def owner_of(key: str | None) -> str:
    """Who a request is, for what it may read back later (a stored response, a stream to resume): a digest
    of its API key ("" when keys are off), never the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


def _parse_keys(value: str) -> list[str]:
    path = Path(value.strip()).expanduser()
    if "," not in value and path.is_file():
        lines = path.read_text().splitlines()
        return [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
    return [k.strip() for k in value.split(",") if k.strip()]


def _any_equal(candidates: list[bytes], presented: bytes) -> bool:
    # Every candidate is compared, so the time taken does not tell which one (or how many) matched.
    found = False
    for key in candidates:
        found |= hmac.compare_digest(key, presented)
    return found


@dataclass(frozen=True)
class Keys:
    keys: list[bytes]
    admin: bytes | None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keys:
        keys = _parse_keys(settings.api_keys) if settings.api_keys else []
        admin = settings.admin_key.strip() if settings.admin_key else ""
        if settings.api_keys and not keys:
            raise ValueError("INFERQ_API_KEYS is set but holds no key")
        if keys or admin:
            logger.info("API keys required: %d key(s), admin key %s", len(keys), "set" if admin else "unset")
        return cls([k.encode() for k in keys], admin.encode() if admin else None)

    def check(
        self, method: str, path: str, presented: bytes | None, managed: bool = False, required: bool = False
    ) -> ApiError | None:
        """The error to answer with, or None when the request may pass. ``managed``: ``presented`` is a
        managed key (api/keystore.py); ``required``: managed keys exist, so every request needs a key."""
        if path in OPEN_PATHS:
            return None
        management = path == MANAGEMENT_PREFIX or path.startswith(MANAGEMENT_PREFIX + "/")
        admin_only = path.startswith(ADMIN_ONLY)
        if (admin_only or (management and method not in READ_METHODS)) and self.admin is not None:
            if presented is not None and hmac.compare_digest(self.admin, presented):
                return None
            if presented is not None and (managed or _any_equal(self.keys, presented)):
                return forbidden()
            return unauthorized(presented is not None)
        if managed:
            return None
        if not self.keys and not required:
            return None  # no key but perhaps the admin's is configured: everything else stays open
        candidates = self.keys + ([self.admin] if self.admin is not None else [])
        if presented is not None and _any_equal(candidates, presented):
            return None
        return unauthorized(presented is not None)


def unauthorized(had_key: bool) -> ApiError:
    message = (
        "Incorrect API key provided."
        if had_key
        else "Missing API key: send it as `Authorization: Bearer <key>`."
    )
    return ApiError(401, message, "invalid_request_error", None, "invalid_api_key")


def forbidden() -> ApiError:
    return ApiError(
        403,
        "This management route needs the admin key.",
        "permission_error",
        None,
        "insufficient_permissions",
    )


def _presented(scope: Scope) -> bytes | None:
    """The key a request carries: ``Authorization: Bearer`` (OpenAI's SDKs) or ``x-api-key`` (Anthropic's)."""
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                return bytes(token.strip())
        elif name == b"x-api-key" and value.strip():
            return bytes(value.strip())
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, keys: Keys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        method, path, presented = scope.get("method", "GET"), scope["path"], _presented(scope)
        managed: ManagedKey | None = None
        admission: Admission | None = None
        error: ApiError | None
        try:
            if path not in OPEN_PATHS and cast(RedisBreaker, scope["app"].state.breaker).open:
                # Redis is known not to answer: say so now rather than after a timeout of this request's own.
                error = errors.redis_unavailable()
            elif path not in OPEN_PATHS:
                store, limiter = _managed(scope)
                if presented is not None:
                    managed = await store.lookup(digest(presented))
                required = managed is None and not self.keys.keys and await store.any()
                error = self.keys.check(method, path, presented, managed is not None, required)
                if error is None and managed is not None and _limited(managed):
                    counted = method == "POST" and path in COUNTED
                    admission = await limiter.admit(
                        managed, count=counted, anthropic=errors.is_anthropic(path)
                    )
                    error = admission.error
            else:
                error = None
        except redis.RedisError as exc:
            logger.warning("key check: Redis unavailable: %r", exc)
            error = errors.redis_unavailable()
        if error is None:
            await self._serve(scope, receive, send, presented, managed, admission)
            return
        if scope["type"] == "websocket":
            # Closing before the handshake is accepted makes the server refuse the upgrade (HTTP 403).
            await send({"type": "websocket.close", "code": 1008, "reason": error.message})
            return
        headers = dict(admission.headers) if admission is not None else {}
        if error.status == 401:
            headers["www-authenticate"] = "Bearer"
        await respond(path, error, headers or None)(scope, receive, send)

    async def _serve(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        presented: bytes | None,
        key: ManagedKey | None,
        admission: Admission | None,
    ) -> None:
        token = requested_key.set(key)
        if key is not None:
            account = Account(key.id, key.name)
        elif presented is not None:
            owner = owner_of(presented.decode(errors="replace"))
            account = Account(f"owner-{owner[:12]}", f"owner-{owner[:12]}")
        else:
            account = ANONYMOUS
        account_token = requested_account.set(account)
        limits = admission.headers if admission is not None else {}

        async def send_with(message: Message) -> None:
            # The key's limits on every answer, streamed ones included (their headers go first).
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in limits.items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with if limits else send)
        finally:
            requested_key.reset(token)
            requested_account.reset(account_token)
            if key is not None and admission is not None and admission.holds:
                _, limiter = _managed(scope)
                try:
                    await limiter.release(key)
                except redis.RedisError as exc:
                    logger.warning("key %s: in-flight count not released: %r", key.id, exc)


def _limited(key: ManagedKey) -> bool:
    return any(v is not None for v in (key.rpm, key.tpm, key.max_concurrent, key.monthly_tokens))


def _managed(scope: Scope) -> tuple[KeyStore, Limiter]:
    """The process's key store and limiter (the lifespan put them on the app's state)."""
    state = scope["app"].state
    return cast(KeyStore, state.keystore), cast(Limiter, state.limiter)
