"""Embeddings over the serving core: one job for all inputs, on a worker of the model like any other job."""

from __future__ import annotations

import base64
import uuid
from array import array

from fastapi import Response

from api import errors
from api.protocol.embeddings import Embedding, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from api.serving import core, fanout
from api.serving.fanout import JobIds
from queueing.catalog import ModelSpec
from queueing.jobs import Job


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


def work(body: EmbeddingRequest, spec: ModelSpec, ids: JobIds | None = None) -> core.Work:
    if not spec.embeddings:
        raise errors.invalid_request(
            f"The model `{body.model}` does not serve embeddings.", "model", "model_not_supported"
        )
    if body.dimensions is not None:
        raise errors.invalid_request("`dimensions` is not supported.", "dimensions", "unsupported_value")
    job = Job(id=f"embd-{uuid.uuid4().hex}", kind="embedding", model=body.model, inputs=body.inputs())
    return core.Work(fanout.named([job], ids))


async def complete(body: EmbeddingRequest, serve: core.Serve) -> tuple[EmbeddingList, core.Outcome]:
    """One embeddings request, start to end (the route's and a batch line's)."""
    outcome = await serve.complete(work(body, serve.spec, serve.ids))
    (finished,) = outcome.finished
    vectors = finished.embeddings or []
    result = EmbeddingList(
        data=[Embedding(index=i, embedding=_encode(v, body.encoding_format)) for i, v in enumerate(vectors)],
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=finished.prompt_tokens, total_tokens=finished.prompt_tokens),
    )
    return result, outcome


async def respond(body: EmbeddingRequest, serve: core.Serve) -> Response:
    return core.json_response(*await complete(body, serve))
