"""The Responses API's serving logic beyond one request's adapter: stored responses, continuing them,
cancelling and replaying background responses (api/responses/background.py drives them), the input items
and compaction."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from api import errors, resume
from api.adapters import responses
from api.adapters.responses_items import compaction_content, context_items
from api.adapters.responses_stream import TERMINAL, Writer, events_of
from api.deps import model_spec
from api.jobs import Disconnected, Dispatcher, RunOptions
from api.protocol.responses import (
    CompactionItem,
    CompactRequest,
    CompactResponse,
    InputItemList,
    OutputMessage,
    ResponseObject,
    ResponsesRequest,
    StoredMessage,
)
from api.protocol.responses_events import ResponseStreamEvent
from api.responses.background import ENDED, BackgroundResponses
from api.responses.store import ResponseStore, StoredResponse
from api.serving import core
from api.sessions import use_session
from queueing.catalog import Catalog
from queueing.jobs import JobState

_POLL_MS = 500
# A compaction's summary is short; bounded so that a model that rambles cannot write up to its context length
# (on a CPU, past the request's timeout: schemathesis found one).
COMPACT_SUMMARY_TOKENS = 512

COMPACT_INSTRUCTIONS = (
    "Summarize the conversation so far for your own later use: keep every fact, decision, open question and "
    "tool result that matters. Reply with the summary only."
)


def not_found(response_id: str) -> errors.ApiError:
    return errors.ApiError(
        404,
        f"Response with id '{response_id}' not found.",
        "invalid_request_error",
        "response_id",
        "not_found",
    )


@dataclass
class Responses:
    dispatcher: Dispatcher
    store: ResponseStore
    catalog: Catalog
    background: BackgroundResponses

    async def previous(
        self, body: ResponsesRequest, owner: str, known: dict[str, StoredResponse] | None = None
    ) -> StoredResponse | None:
        if body.previous_response_id is None:
            return None
        found = (known or {}).get(body.previous_response_id) or await self.store.get(
            body.previous_response_id, owner
        )
        if found is None:
            raise errors.ApiError(
                404,
                f"Previous response with id '{body.previous_response_id}' not found.",
                "invalid_request_error",
                "previous_response_id",
                "previous_response_not_found",
            )
        return found

    async def prepare(
        self,
        body: ResponsesRequest,
        owner: str,
        *,
        stream: bool,
        known: dict[str, StoredResponse] | None = None,
    ) -> responses.Prepared:
        """``known``: responses a WebSocket connection made, continued also when they were not stored."""
        spec = model_spec(self.catalog, body.model)
        use_session(body.prompt_cache_key)
        return responses.prepare(body, spec, await self.previous(body, owner, known), stream=stream)

    async def save(self, prepared: responses.Prepared, owner: str, response: ResponseObject) -> None:
        if prepared.body.store:
            stored = StoredResponse(
                owner=owner, response=response, context=prepared.context, job_id=prepared.id
            )
            await self.store.save(stored)

    # --- foreground ---

    async def complete(
        self, prepared: responses.Prepared, owner: str, disconnected: Disconnected
    ) -> tuple[ResponseObject, core.Outcome]:
        serve = core.Serve(prepared.spec, self.dispatcher, disconnected)
        response, outcome = await responses.run(prepared, serve)
        await self.save(prepared, owner, response)
        return response, outcome

    async def stream(
        self,
        prepared: responses.Prepared,
        owner: str,
        disconnected: Disconnected | None,
        *,
        resumable: bool = False,
    ) -> tuple[core.Stream, Writer, AsyncIterator[ResponseStreamEvent]]:
        """Start a streamed response: the stream (its headers, its close) and its events; the response is
        stored once its last event was produced. ``resumable``: a client that lost it gets the rest from
        any API process (``resume``)."""
        serve = core.Serve(prepared.spec, self.dispatcher, disconnected)
        if resumable:
            created, context = prepared.skeleton.created_at, prepared.context
            serve = await resume.offer(serve, prepared.work, "responses", prepared.body, created, context)
        stream = await serve.stream(prepared.work)
        return stream, *self._rendered(prepared, owner, stream, -1)

    async def resume(
        self, response_id: str, owner: str, after: int, disconnected: Disconnected
    ) -> tuple[core.Stream, Writer, AsyncIterator[ResponseStreamEvent]] | None:
        """The events after sequence number ``after`` of a streamed response that is still running or
        whose job's log is still kept: rendered again from its kept request and its job's events (the
        same events under the same numbers and ids), then live. None if there is none such of ``owner``."""
        d = self.dispatcher
        kept = await resume.ResumableStore(d.client, d.stream_log_ttl).get(response_id, owner)
        if kept is None or kept.protocol != "responses":
            return None
        record = await d.store.get(response_id)
        if record is None or record.state == JobState.CANCELLED:
            return None  # cancelled (its client stayed away past the grace) or expired: nothing to follow
        await d.leaving.came_back(response_id)
        body = ResponsesRequest.model_validate(kept.body)
        spec = model_spec(self.catalog, body.model)

        def same_id(_: int) -> str:
            return response_id

        prepared = responses.prepare(body, spec, None, same_id, stream=True, context=kept.context or [])
        skeleton = prepared.skeleton.model_copy(update={"created_at": kept.created})
        prepared = dataclasses.replace(prepared, skeleton=skeleton)
        options = RunOptions(resume=True, replay=True, reconnect_grace=d.reconnect_grace, merge_deltas=False)
        stream = await core.Serve(spec, d, disconnected, options, same_id).stream(prepared.work)
        return stream, *self._rendered(prepared, owner, stream, after)

    def _rendered(
        self, prepared: responses.Prepared, owner: str, stream: core.Stream, after: int
    ) -> tuple[Writer, AsyncIterator[ResponseStreamEvent]]:
        """The response's events from its job's: those numbered up to ``after`` are rendered, not sent.
        The response is stored once its last event was produced."""
        writer = Writer(prepared.skeleton)

        async def all_events() -> AsyncIterator[ResponseStreamEvent]:
            for e in writer.start():
                if e.sequence_number > after:
                    yield e
            async for e in events_of(prepared, stream, writer):
                if e.sequence_number > after:
                    yield e
            if writer.final is not None:
                await self.save(prepared, owner, writer.final)

        return writer, all_events()

    async def cancel(self, response_id: str, owner: str) -> ResponseObject:
        stored = await self.store.get(response_id, owner)
        if stored is None:
            raise not_found(response_id)
        if not stored.response.background:
            raise errors.invalid_request(
                "Only background responses can be cancelled.", "response_id", "invalid_value"
            )
        if stored.response.status in ENDED:
            return stored.response
        cancelled = stored.response.model_copy(update={"status": "cancelled"})
        await self.store.save(stored.model_copy(update={"response": cancelled}))
        if stored.job_id is not None:
            await self.dispatcher.store.cancel(stored.job_id)
        self.background.cancel_local(response_id)
        return cancelled

    async def replay(self, response_id: str, owner: str, after: int) -> AsyncIterator[dict[str, object]]:
        """A background response's logged events after sequence number ``after``, then the live ones,
        until its last event (or until it was cancelled)."""
        while True:
            found = await self.store.events_after(response_id, after, _POLL_MS)
            for seq, event in found:
                after = seq
                yield event
                if event.get("type") in TERMINAL:
                    return
            if not found:
                stored = await self.store.get(response_id, owner)
                if stored is None or stored.response.status in ENDED:
                    # One last look: the final event may have been logged just before the status.
                    for seq, event in await self.store.events_after(response_id, after):
                        after = seq
                        yield event
                    return

    async def retrieve(self, response_id: str, owner: str) -> StoredResponse:
        stored = await self.store.get(response_id, owner)
        if stored is None:
            raise not_found(response_id)
        return stored

    async def input_items(
        self, response_id: str, owner: str, after: str | None, limit: int, order: str
    ) -> InputItemList:
        stored = await self.retrieve(response_id, owner)
        items = list(stored.context)
        if order == "desc":
            items.reverse()
        if after is not None:
            ids = [i.get("id") for i in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        data = InputItemList.model_validate(
            {"data": page, "first_id": None, "last_id": None, "has_more": False}
        )
        return data.model_copy(
            update={
                "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None,
                "has_more": len(items) > limit,
            }
        )

    async def compact(self, body: CompactRequest, owner: str, disconnected: Disconnected) -> CompactResponse:
        """The conversation so far in fewer items: the user's messages as they were, everything else
        replaced by one compaction item that holds the model's own summary of it."""
        previous = None
        if body.previous_response_id is not None:
            previous = await self.previous(
                ResponsesRequest(model=body.model, previous_response_id=body.previous_response_id), owner
            )
        context = context_items(previous, body.input or [])
        request = ResponsesRequest(
            model=body.model,
            instructions="\n\n".join(x for x in (body.instructions, COMPACT_INSTRUCTIONS) if x),
            input=[],
            store=False,
            max_output_tokens=COMPACT_SUMMARY_TOKENS,
        )
        spec = model_spec(self.catalog, body.model)
        prepared = responses.prepare(request, spec, None, context=context)
        response, outcome = await responses.run(prepared, core.Serve(spec, self.dispatcher, disconnected))
        summary = "".join(
            part.text for item in response.output if isinstance(item, OutputMessage) for part in item.content
        )
        kept = [
            StoredMessage.model_validate(i)
            for i in context
            if i.get("type") == "message" and i.get("role") == "user"
        ]
        return CompactResponse(
            output=[*kept, CompactionItem(encrypted_content=compaction_content(summary))],
            usage=responses.usage(outcome.usage),
        )
