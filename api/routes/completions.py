"""POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.adapters import completions
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.protocol.completions import Completion, CompletionRequest
from api.serving.core import Serve
from api.sessions import use_session

router = APIRouter()


@router.post("/v1/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    use_session(body.prompt_cache_key)
    return await completions.respond(
        body, Serve(model_spec(catalog, body.model), dispatcher, request.is_disconnected)
    )
