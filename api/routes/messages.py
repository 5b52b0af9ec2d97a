"""POST /v1/messages and POST /v1/messages/count_tokens (Anthropic's Messages API)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import errors
from api.adapters import messages
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.protocol.messages import CountTokensRequest, CountTokensResponse, Message, MessagesRequest
from api.serving.core import Serve

router = APIRouter()


@router.post("/v1/messages", response_model=Message)
async def create_message(
    body: MessagesRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    return await messages.respond(
        body, Serve(model_spec(catalog, body.model), dispatcher, request.is_disconnected)
    )


@router.post("/v1/messages/count_tokens", response_model=CountTokensResponse)
async def count_message_tokens(
    body: CountTokensRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    serve = Serve(model_spec(catalog, body.model), dispatcher, request.is_disconnected)
    counted = await messages.count_tokens(body, serve)
    return JSONResponse(
        counted.model_dump(), headers={errors.REQUEST_ID_HEADER: errors.anthropic_request_id()}
    )
