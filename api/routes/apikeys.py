"""Managed API keys (api/keystore.py) under /v1/system/keys: create (the key is shown once), list, revoke;
and the usage ledger (api/usage.py) at /v1/system/usage. Only the admin key may use these routes when one
is set (api/auth.py)."""

from __future__ import annotations

import datetime
from typing import Literal, cast

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api import errors
from api.deps import DispatcherDep
from api.keystore import CreatedKey, KeyCreate, KeyStore, ManagedKey
from api.usage import UsageList

router = APIRouter(prefix="/v1/system", tags=["keys"])


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ManagedKey]


class DeletedKey(BaseModel):
    id: str
    object: Literal["api_key.deleted"] = "api_key.deleted"
    deleted: bool = True


def _store(request: Request) -> KeyStore:
    return cast(KeyStore, request.app.state.keystore)


@router.post("/keys", response_model=CreatedKey)
async def create_key(body: KeyCreate, request: Request) -> CreatedKey:
    return await _store(request).create(body)


@router.get("/keys", response_model=KeyList)
async def list_keys(request: Request) -> KeyList:
    return KeyList(data=await _store(request).list())


@router.delete("/keys/{key_id}", response_model=DeletedKey)
async def revoke_key(key_id: str, request: Request) -> DeletedKey:
    if await _store(request).revoke(key_id) is None:
        raise errors.ApiError(404, f"No API key '{key_id}'.", "invalid_request_error", "key_id", "not_found")
    return DeletedKey(id=key_id)


@router.get("/usage", response_model=UsageList)
async def usage(
    dispatcher: DispatcherDep, start_date: datetime.date | None = None, end_date: datetime.date | None = None
) -> UsageList:
    """Per day (UTC), key and model: requests, errors, prompt, cached and completion tokens, from
    ``start_date`` to ``end_date`` (both included; default: today)."""
    today = datetime.datetime.now(datetime.UTC).date()
    start, end = start_date or end_date or today, end_date or start_date or today
    if end < start:
        raise errors.invalid_request("`end_date` is before `start_date`.", "end_date", "invalid_value")
    return UsageList(data=await dispatcher.ledger.read(start, end))
