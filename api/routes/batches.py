"""The Batch API: create, retrieve, list and cancel batches. The lines run in api/batches/driver.py."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, cast

from fastapi import APIRouter, Query, Request

from api import errors
from api.batches.driver import BatchDriver
from api.deps import FilesDep, OwnerDep
from api.keystore import requested_key
from api.protocol.batches import Batch, BatchCreateRequest, BatchList, RequestCounts, window_seconds
from api.usage import requested_account

router = APIRouter()


def _driver(request: Request) -> BatchDriver:
    return cast(BatchDriver, request.app.state.batches)


async def _batch(driver: BatchDriver, batch_id: str, owner: str) -> Batch:
    found = await driver.store.get(batch_id, owner)
    if found is None:
        message = f"No batch found with id '{batch_id}'."
        raise errors.ApiError(404, message, "invalid_request_error", "batch_id", "batch_not_found")
    return found


@router.post("/v1/batches", response_model=Batch)
async def create_batch(body: BatchCreateRequest, request: Request, files: FilesDep, owner: OwnerDep) -> Batch:
    driver = _driver(request)
    source = await files.get(body.input_file_id, owner)
    if source.purpose != "batch":
        raise errors.invalid_request(
            f"File {source.id} has purpose '{source.purpose}'; a batch input needs purpose 'batch'.",
            "input_file_id",
            "invalid_file_purpose",
        )
    # Every line is checked now: a malformed file is refused with its line numbers instead of failing later.
    requests = await driver.read_input(source.id, owner)
    models = {line.request.body.get("model") for line in requests}
    key = requested_key.get()
    if key is not None and key.models is not None:
        # The lines run without the request's key around them: a model the key may not call is refused now.
        refused = sorted(str(m) for m in models if m is not None and m not in key.models)
        if refused:
            raise errors.model_not_found(refused[0])
    now = int(time.time())
    batch = Batch(
        id=f"batch_{uuid.uuid4().hex}",
        endpoint=body.endpoint,
        # OpenAI names the model when the batch has one; inferq batches may mix models.
        model=str(models.pop()) if len(models) == 1 and None not in models else None,
        input_file_id=source.id,
        completion_window=body.completion_window,
        status="validating",
        created_at=now,
        expires_at=now + window_seconds(body.completion_window),
        request_counts=RequestCounts(total=len(requests)),
        metadata=body.metadata,
    )
    await driver.store.create(batch, owner, requested_account.get())
    driver.wake()
    return batch


@router.get("/v1/batches/{batch_id}", response_model=Batch)
async def retrieve_batch(batch_id: str, request: Request, owner: OwnerDep) -> Batch:
    return await _batch(_driver(request), batch_id, owner)


@router.get("/v1/batches", response_model=BatchList)
async def list_batches(
    request: Request,
    owner: OwnerDep,
    after: str | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> BatchList:
    return await _driver(request).store.page(after, limit, owner)


@router.post("/v1/batches/{batch_id}/cancel", response_model=Batch)
async def cancel_batch(batch_id: str, request: Request, owner: OwnerDep) -> Batch:
    driver = _driver(request)
    batch = await _batch(driver, batch_id, owner)
    if batch.status in ("cancelling", "cancelled"):
        return batch
    if not await driver.store.move(batch_id, "cancelling", ["validating", "in_progress"]):
        raise errors.ApiError(
            409,
            f"Batch {batch_id} is {batch.status} and can no longer be cancelled.",
            "invalid_request_error",
            "batch_id",
            "batch_not_cancellable",
        )
    # Whichever API process drives the batch sees the status within a poll and finalizes it.
    driver.wake()
    return await _batch(driver, batch_id, owner)
