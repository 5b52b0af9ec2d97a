"""POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.adapters import chat
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.protocol.chat import ChatCompletion, ChatCompletionRequest
from api.serving.core import Serve
from api.sessions import use_session

router = APIRouter()


@router.post("/v1/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    use_session(body.prompt_cache_key)
    return await chat.respond(
        body, Serve(model_spec(catalog, body.model), dispatcher, request.is_disconnected)
    )
