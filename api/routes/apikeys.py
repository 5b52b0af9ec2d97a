"""Managed API keys (api/keystore.py) under /v1/system/keys: create (the key is shown once), list, revoke.
Only the admin key may use these routes when one is set (api/auth.py)."""

from __future__ import annotations

from typing import Literal, cast

from fastapi import APIRouter, Request
from pydantic import BaseModel

from api import errors
from api.keystore import CreatedKey, KeyCreate, KeyStore, ManagedKey

router = APIRouter(prefix="/v1/system/keys", tags=["keys"])


class KeyList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ManagedKey]


class DeletedKey(BaseModel):
    id: str
    object: Literal["api_key.deleted"] = "api_key.deleted"
    deleted: bool = True


def _store(request: Request) -> KeyStore:
    return cast(KeyStore, request.app.state.keystore)


@router.post("", response_model=CreatedKey)
async def create_key(body: KeyCreate, request: Request) -> CreatedKey:
    return await _store(request).create(body)


@router.get("", response_model=KeyList)
async def list_keys(request: Request) -> KeyList:
    return KeyList(data=await _store(request).list())


@router.delete("/{key_id}", response_model=DeletedKey)
async def revoke_key(key_id: str, request: Request) -> DeletedKey:
    if await _store(request).revoke(key_id) is None:
        raise errors.ApiError(404, f"No API key '{key_id}'.", "invalid_request_error", "key_id", "not_found")
    return DeletedKey(id=key_id)
