"""Limits on a JSON body, checked on its bytes before anything parses it: size, UTF-8, nesting depth and
lone UTF-16 surrogates, each a 4xx in the protocol's envelope instead of a 500 further in.

Why on the bytes: Python's ``json`` recurses once per level (100,000 ``[`` raise ``RecursionError``),
pydantic's serializer gives up past a few hundred levels when the job is written to Redis, and ``json``
turns ``"\\ud800"`` (and, decoding bytes with ``surrogatepass``, the raw bytes of a surrogate) into a ``str``
that cannot be encoded as UTF-8 again, which fails only when the job is serialized. Catching
``RecursionError`` would cover only the first. One scan that skips string contents and measures the brackets
costs about what parsing does (10 MB bodies on this machine: chat prose 74 ms against ``json.loads``' 49 ms,
ASCII-escaped prose 113 ms against 32 ms, token ids 20 ms against 132 ms, a hostile body of nothing but
brackets 331 ms against 2.4 s), so it is done for every JSON body, by the middleware here, and for every
batch line and WebSocket message by their readers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import errors
from queueing.settings import Settings

# A JSON string: the unrolled loop runs `[^"\\]*` as one tight match, ten times faster than an alternation.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
# Outside strings only the brackets matter; objects and arrays nest alike.
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_ONE_KIND = bytes.maketrans(b"{}", b"[]")
_STEP = [0] * 256
_STEP[ord("[")], _STEP[ord("]")] = 1, -1
# Surrogate escapes, and the pair of a high one followed by a low one (an emoji as ASCII-only JSON writes it).
# A literal prefix, so the search runs at memchr speed where a lookbehind would try every position.
_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_PAIR = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}")
_JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_depth: int

    @classmethod
    def from_settings(cls, s: Settings) -> Limits:
        return cls(s.max_body_bytes, s.max_json_depth)


def depth(raw: bytes) -> int:
    """How deep the arrays and objects of a JSON text nest (0 for a scalar), ignoring string contents."""
    brackets = _STRING.sub(b"", raw).translate(_ONE_KIND, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0)


def check(raw: bytes, max_depth: int, what: str = "The body") -> None:
    """Refuses (400) a JSON text that is not UTF-8, nests deeper than ``max_depth``, or holds a lone
    surrogate; anything else, valid JSON or not, is left to the parser (which now cannot recurse too far)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.invalid_request(
            f"{what} is not valid JSON: not UTF-8 (byte {exc.start}: {exc.reason}).", None, "invalid_encoding"
        ) from None
    levels = depth(raw)
    if levels > max_depth:
        raise errors.invalid_request(
            f"{what} nests {levels} levels of arrays and objects; at most {max_depth} are allowed.",
            None,
            "json_too_deep",
        )
    if _maybe_lone(raw):
        _check_surrogates(text, what)


def _maybe_lone(raw: bytes) -> bool:
    """Whether some surrogate escape is not half of a pair; a false alarm (the escape follows an escaped
    backslash, so it is text) only costs the exact check."""
    match = _SURROGATE.search(raw)
    while match is not None:
        if not _PAIR.match(raw, match.start()):
            return True
        match = _SURROGATE.search(raw, match.start() + 12)
    return False


def _check_surrogates(text: str, what: str) -> None:
    try:
        doc = json.loads(text)
    except ValueError:
        return  # the parser answers it as invalid JSON
    where = _surrogate_at(doc)
    if where is not None:
        param = where or None
        at = f" at `{param}`" if param else ""
        raise errors.invalid_request(
            f"{what} holds a lone UTF-16 surrogate{at}: a \\ud800-\\udfff escape that is not half of a pair "
            "is not Unicode text.",
            param,
            "invalid_encoding",
        )


def _encodable(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _surrogate_at(doc: Any) -> str | None:
    """The path (``messages[0].content``) of the first string or key that is not UTF-8 encodable, ``""`` for
    the document itself, None when there is none. A loop, not recursion: the depth is bounded, but cheaply."""
    stack: list[tuple[str, Any]] = [("", doc)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            if not _encodable(value):
                return path
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                named = f"{path}.{key}" if path else str(key)
                if not _encodable(key):
                    return path
                stack.append((named, item))
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", item) for i, item in reversed(list(enumerate(value))))
    return None


def too_large(limit: int) -> errors.ApiError:
    return errors.ApiError(
        413,
        f"The body is larger than the {limit} bytes this server accepts.",
        "invalid_request_error",
        None,
        "request_too_large",
    )


def _is_json(scope: Scope) -> bool:
    # FastAPI parses a body as JSON when it says so, and also when it has no content type at all.
    for name, value in scope["headers"]:
        if name == b"content-type":
            kind = value.decode("latin-1").split(";", 1)[0].strip().lower()
            return kind in _JSON_TYPES or (kind.startswith("application/") and kind.endswith("+json"))
    return True


class InputLimitsMiddleware:
    """Reads a JSON request body up to the size limit, checks it, and hands the same bytes on; other bodies
    (multipart file uploads, with their own limit) and WebSocket connections pass untouched."""

    def __init__(self, app: ASGIApp, limits: Limits) -> None:
        self.app = app
        self.limits = limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS") or not _is_json(scope):
            await self.app(scope, receive, send)
            return
        try:
            body = await self._read(scope, receive)
            check(body, self.limits.max_depth)
        except errors.ApiError as exc:
            await errors.respond(scope["path"], exc)(scope, receive, send)
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, when it comes
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, scope: Scope, receive: Receive) -> bytes:
        limit = self.limits.max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise too_large(limit)
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise errors.client_closed()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large(limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)
