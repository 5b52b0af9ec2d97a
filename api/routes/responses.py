"""The Responses API: POST /v1/responses (JSON, SSE, and a WebSocket for long tool loops), retrieve (and
replay a background response's stream), delete, cancel, input items, compact."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Depends, Query, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from api import errors, input_limits
from api.adapters.responses_stream import Writer
from api.auth import key_of, owner_of
from api.deps import OwnerDep
from api.protocol.responses import (
    CompactRequest,
    CompactResponse,
    DeletedResponse,
    InputItemList,
    ResponseCreateMessage,
    ResponseObject,
    ResponsesRequest,
)
from api.protocol.responses_events import ResponseStreamEvent, WebSocketErrorBody, WebSocketErrorEvent
from api.responses.service import Responses, not_found
from api.responses.store import StoredResponse
from api.serving import sse

logger = logging.getLogger(__name__)
router = APIRouter()


def _responses(request: Request) -> Responses:
    return cast(Responses, request.app.state.responses)


ResponsesDep = Annotated[Responses, Depends(_responses)]


def _frame(event: ResponseStreamEvent | dict[str, Any]) -> sse.Frame:
    # The SSE id is the event's sequence number: an EventSource that reconnects with it as Last-Event-ID
    # gets the rest (retrieve_response).
    if isinstance(event, dict):
        number = str(event.get("sequence_number"))
        return sse.Frame(json.dumps(event), event=str(event.get("type")), id=number)
    return sse.Frame(event.model_dump_json(), event=event.type, id=str(event.sequence_number))


async def _frames(events: AsyncIterator[ResponseStreamEvent | dict[str, Any]]) -> AsyncIterator[sse.Frame]:
    async for event in events:
        yield _frame(event)


def _framing(writer: Writer | None) -> sse.Framing:
    """A streamed response's error: the ``error`` event and ``response.failed``, numbered in its sequence."""

    def error(exc: errors.ApiError) -> list[sse.Frame]:
        if writer is None:
            return [
                sse.Frame(
                    json.dumps({"type": "error", "sequence_number": 0, "error": exc.body()["error"]}), "error"
                )
            ]
        return [_frame(e) for e in writer.failed(exc)]

    return sse.Framing(error=error)


@router.post("/v1/responses", response_model=ResponseObject)
async def create_response(
    body: ResponsesRequest, request: Request, service: ResponsesDep, owner: OwnerDep
) -> Response:
    prepared = await service.prepare(body, owner, stream=body.stream or body.background)
    if body.background:
        queued = await service.background.begin(prepared, owner)
        if not body.stream:
            return JSONResponse(queued.model_dump(mode="json"))
        return sse.respond(_frames(service.replay(prepared.id, owner, -1)), _framing(None))
    if not body.stream:
        response, outcome = await service.complete(prepared, owner, request.is_disconnected)
        return JSONResponse(response.model_dump(mode="json"), headers=outcome.headers)
    stream, writer, events = await service.stream(prepared, owner, request.is_disconnected, resumable=True)
    return sse.respond(_frames(events), _framing(writer), stream.close, stream.headers)


@router.post("/v1/responses/compact", response_model=CompactResponse)
async def compact_response(
    body: CompactRequest, request: Request, service: ResponsesDep, owner: OwnerDep
) -> CompactResponse:
    return await service.compact(body, owner, request.is_disconnected)


@router.get("/v1/responses/{response_id}", response_model=ResponseObject)
async def retrieve_response(
    response_id: str,
    request: Request,
    service: ResponsesDep,
    owner: OwnerDep,
    stream: bool = False,
    starting_after: Annotated[int | None, Query(ge=-1)] = None,
    include: Annotated[list[str] | None, Query()] = None,
) -> Response:
    """The stored response; with ``stream``, its events after ``starting_after`` (or the ``Last-Event-ID``
    header an EventSource sends, the same number): a background response's
    from its log (OpenAI's resume), a streamed one's (inferq's too) rendered again from its job's log, on
    any API process, as long as that log is kept (``INFERQ_STREAM_LOG_TTL``)."""
    if not stream:
        return JSONResponse((await service.retrieve(response_id, owner)).response.model_dump(mode="json"))
    after = -1 if starting_after is None else starting_after
    last_event_id = request.headers.get("last-event-id", "")
    if starting_after is None and last_event_id.isdigit():
        after = int(last_event_id)
    stored = await service.store.get(response_id, owner)
    if stored is not None and stored.response.background:
        return sse.respond(_frames(service.replay(response_id, owner, after)), _framing(None))
    resumed = await service.resume(response_id, owner, after, request.is_disconnected)
    if resumed is not None:
        rest, writer, events = resumed
        return sse.respond(_frames(events), _framing(writer), rest.close, rest.headers)
    if stored is None:
        raise not_found(response_id)
    raise errors.invalid_request(
        "This response can no longer be streamed again: it was not created with `background`, and its "
        "stream's log has expired (INFERQ_STREAM_LOG_TTL).",
        "stream",
        "invalid_value",
    )


@router.delete("/v1/responses/{response_id}", response_model=DeletedResponse)
async def delete_response(response_id: str, service: ResponsesDep, owner: OwnerDep) -> DeletedResponse:
    if not await service.store.delete(response_id, owner):
        raise not_found(response_id)
    return DeletedResponse(id=response_id)


@router.post("/v1/responses/{response_id}/cancel", response_model=ResponseObject)
async def cancel_response(response_id: str, service: ResponsesDep, owner: OwnerDep) -> ResponseObject:
    return await service.cancel(response_id, owner)


@router.get("/v1/responses/{response_id}/input_items", response_model=InputItemList)
async def list_input_items(
    response_id: str,
    service: ResponsesDep,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: Annotated[list[str] | None, Query()] = None,
) -> InputItemList:
    return await service.input_items(response_id, owner, after, limit, order)


# --- WebSocket mode ---


def _ws_error(exc: errors.ApiError) -> str:
    errors.counted(exc)
    body = WebSocketErrorBody(type=exc.type, code=exc.code or exc.type, message=exc.message, param=exc.param)
    return WebSocketErrorEvent(status=exc.status, error=body).model_dump_json()


@router.websocket("/v1/responses")
async def responses_websocket(websocket: WebSocket) -> None:
    """OpenAI's WebSocket mode: each ``response.create`` message runs one response, whose events come
    back as text messages in order; one response at a time per connection. A response continues an
    earlier one of the same connection by ``previous_response_id`` even when it was not stored."""
    service = cast(Responses, websocket.app.state.responses)
    owner = owner_of(key_of(websocket.headers))
    limits = cast(input_limits.Limits, websocket.app.state.input_limits)
    await websocket.accept()
    # The responses of this connection, for previous_response_id also when they were not stored.
    known: dict[str, StoredResponse] = {}
    try:
        while True:
            raw = await websocket.receive_text()
            try:
                input_limits.check(raw.encode(), limits.max_depth, "The message")
                message = ResponseCreateMessage.model_validate_json(raw)
                await _ws_turn(websocket, service, owner, message, known)
            except ValidationError as exc:
                await websocket.send_text(_ws_error(errors.invalid_body(exc.errors())))
            except errors.ApiError as exc:
                await websocket.send_text(_ws_error(exc))
    except WebSocketDisconnect:
        return


async def _ws_turn(
    websocket: WebSocket,
    service: Responses,
    owner: str,
    message: ResponseCreateMessage,
    known: dict[str, StoredResponse],
) -> None:
    body = ResponsesRequest.model_validate(message.model_dump(exclude={"type"}, by_alias=True))
    prepared = await service.prepare(body, owner, stream=True, known=known)
    stream, writer, events = await service.stream(prepared, owner, None)
    try:
        async for event in events:
            await websocket.send_text(event.model_dump_json())
    finally:
        await stream.close()
    if writer.final is not None:
        known.clear()  # only the latest is continued; older ones stay reachable if they were stored
        known[prepared.id] = StoredResponse(owner=owner, response=writer.final, context=prepared.context)
