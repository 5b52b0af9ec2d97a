"""POST /v1/embeddings: one job for all inputs, on a worker of the model like any other job."""

from __future__ import annotations

import base64
import json
import uuid
from array import array

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import errors
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.fanout import WORKER_HEADER
from api.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from queueing import events
from queueing.jobs import Job

router = APIRouter()


def _encode(vector: list[float], encoding: str) -> list[float] | str:
    if encoding == "float":
        return vector
    packed = array("f", vector)
    if packed.itemsize != 4:
        raise AssertionError("float32 arrays expected")
    # OpenAI's base64 is little-endian float32; array uses the machine's order.
    if array("H", [1]).tobytes() != b"\x01\x00":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode()


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    spec = model_spec(catalog, body.model)
    if not spec.embeddings:
        raise errors.invalid_request(
            f"The model `{body.model}` does not serve embeddings.", "model", "model_not_supported"
        )
    if body.dimensions is not None:
        raise errors.invalid_request("`dimensions` is not supported.", "dimensions", "unsupported_value")
    job = Job(id=f"embd-{uuid.uuid4().hex}", kind="embedding", model=body.model, inputs=body.inputs())
    finished: events.Finished | None = None
    async with dispatcher.run(job, request.is_disconnected) as run:
        await run.start()
        async for event in run.rest():
            if isinstance(event, events.Finished):
                finished = event
    assert finished is not None  # rest() ends with Finished or raises
    vectors = finished.embeddings
    if vectors is None:
        # The Finished event was lost and rebuilt from the job record, which keeps the vectors as JSON.
        vectors = json.loads((await dispatcher.store.get(job.id)).get("embeddings", "[]"))
    result = EmbeddingList(
        data=[Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=finished.prompt_tokens, total_tokens=finished.prompt_tokens),
    )
    return JSONResponse(result.model_dump(mode="json"), headers={WORKER_HEADER: run.worker or ""})
