"""POST /v1/embeddings: one job for all inputs, on a worker of the model like any other job."""

from __future__ import annotations

import base64
import json
import uuid
from array import array

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import errors, fanout
from api.deps import CatalogDep, DispatcherDep, model_spec
from api.fanout import WORKER_HEADER
from api.jobs import INTERACTIVE, Disconnected, Dispatcher, JobRun, RunOptions
from api.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from queueing.catalog import ModelSpec
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


def embedding_job(body: EmbeddingRequest, spec: ModelSpec, job_ids: fanout.JobIds | None = None) -> Job:
    if not spec.embeddings:
        raise errors.invalid_request(
            f"The model `{body.model}` does not serve embeddings.", "model", "model_not_supported"
        )
    if body.dimensions is not None:
        raise errors.invalid_request("`dimensions` is not supported.", "dimensions", "unsupported_value")
    job = Job(id=f"embd-{uuid.uuid4().hex}", kind="embedding", model=body.model, inputs=body.inputs())
    return fanout.named([job], job_ids)[0]


async def complete(
    body: EmbeddingRequest,
    spec: ModelSpec,
    dispatcher: Dispatcher,
    disconnected: Disconnected | None,
    options: RunOptions = INTERACTIVE,
    job_ids: fanout.JobIds | None = None,
) -> tuple[EmbeddingList, list[JobRun]]:
    """One embeddings request, start to end (the route's and a batch line's)."""
    job = embedding_job(body, spec, job_ids)
    (finished,), runs = await fanout.complete_all(dispatcher, [job], disconnected, options)
    vectors = finished.embeddings
    if vectors is None:
        # The Finished event was lost and rebuilt from the job record, which keeps the vectors as JSON.
        vectors = json.loads((await dispatcher.store.get(job.id)).get("embeddings", "[]"))
    result = EmbeddingList(
        data=[Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=finished.prompt_tokens, total_tokens=finished.prompt_tokens),
    )
    return result, runs


@router.post("/v1/embeddings", response_model=EmbeddingList)
async def create_embeddings(
    body: EmbeddingRequest, request: Request, dispatcher: DispatcherDep, catalog: CatalogDep
) -> Response:
    spec = model_spec(catalog, body.model)
    result, runs = await complete(body, spec, dispatcher, request.is_disconnected)
    return JSONResponse(result.model_dump(mode="json"), headers={WORKER_HEADER: runs[0].worker or ""})
