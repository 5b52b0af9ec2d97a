"""POST /v1/embeddings."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from api.adapters import embeddings
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.protocol.embeddings import EmbeddingList, EmbeddingRequest
from api.serving.core import Serve

router = APIRouter()


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    return await embeddings.respond(
        body, Serve(model_spec(catalog, body.model), dispatcher, request.is_disconnected)
    )
