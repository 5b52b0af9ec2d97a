"""GET /v1/streams/{id}: the rest of a chat or completions stream whose client lost its connection
(api/resume.py). The id is the completion's (its chunks' ``id``); ``Last-Event-ID`` (the header, as
EventSource sends it, or the ``last_event_id`` query parameter) the last event the client had; without it,
the whole stream from its start."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from api import errors, resume
from api.adapters import chat, completions
from api.auth import key_of, owner_of
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.jobs import RunOptions
from api.protocol.chat import ChatCompletionRequest
from api.protocol.completions import CompletionRequest
from api.serving.core import Serve
from queueing.jobs import JobState

router = APIRouter()


def _gone(stream_id: str, why: str) -> errors.ApiError:
    return errors.ApiError(
        404, f"No stream {stream_id} to resume: {why}", "invalid_request_error", "id", "stream_not_found"
    )


@router.get(resume.STREAM_ROUTE)
async def resume_stream(
    stream_id: str,
    request: Request,
    dispatcher: DispatcherDep,
    catalog: CatalogDep,
    last_event_id: Annotated[str | None, Query()] = None,
) -> Response:
    raw = request.headers.get("last-event-id") or last_event_id
    after = resume.FrameId.parse(raw) if raw else None
    if raw and after is None:
        raise errors.invalid_request(
            f"Last-Event-ID {raw!r} is not an event id of an inferq stream.", "last_event_id", "invalid_value"
        )
    store = resume.ResumableStore(dispatcher.client, dispatcher.stream_log_ttl)
    kept = await store.get(stream_id, owner_of(key_of(request.headers)))
    if kept is None:
        raise _gone(stream_id, "unknown, not yours, or older than its event log (stream_log_ttl).")
    record = await dispatcher.store.get(stream_id)
    if record is None or record.state == JobState.CANCELLED:
        # Its client stayed away past the reconnect grace, or its record expired: following it would mean
        # generating it anew, and the text already sent would not match.
        raise _gone(stream_id, "its job was cancelled or has expired.")
    await dispatcher.leaving.came_back(stream_id)
    options = RunOptions(
        resume=True, replay=True, reconnect_grace=dispatcher.reconnect_grace, merge_deltas=False
    )
    if kept.protocol == "chat":
        chat_body = ChatCompletionRequest.model_validate(kept.body)
        serve = Serve(
            model_spec(catalog, chat_body.model),
            dispatcher,
            request.is_disconnected,
            options,
            lambda _: stream_id,
        )
        return await chat.resumed(chat_body, serve, kept.created, after)
    body = CompletionRequest.model_validate(kept.body)
    serve = Serve(
        model_spec(catalog, body.model), dispatcher, request.is_disconnected, options, lambda _: stream_id
    )
    return await completions.resumed(body, serve, kept.created, after)
