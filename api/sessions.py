"""A request's explicit session: what `affinity` routing keeps together on one worker.

OpenAI's `prompt_cache_key` in the body (chat, completions, responses) names it, else the first of the
session headers that coding agents and gateways send (Claude Code, SGLang's and Dynamo's routers). Set once
per request (the app-wide dependency in api/app.py, then ``use_session`` by the routes that read a body),
read when its jobs are submitted (api/jobs.py).
"""

from __future__ import annotations

import hashlib
from contextvars import ContextVar

# Read in this order; a body's `prompt_cache_key` takes precedence (use_session).
SESSION_HEADERS = ("x-session-id", "x-session-affinity", "x-claude-code-session-id", "session-id")
# The request's explicit session, as a digest: it names a Redis key, and need not reveal who the user is.
requested_session: ContextVar[str | None] = ContextVar("requested_session", default=None)


def session_digest(value: str | None) -> str | None:
    if not value:
        return None
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def use_session(prompt_cache_key: str | None) -> None:
    """A body's `prompt_cache_key` names the request's session (over a session header)."""
    if prompt_cache_key:
        requested_session.set(session_digest(prompt_cache_key))
