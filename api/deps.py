"""Request dependencies: the long-lived objects the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated, cast

import redis.asyncio as aredis
from fastapi import Depends, Request

from api import access_log, errors
from api.auth import key_of, owner_of
from api.files import Files
from api.jobs import Dispatcher
from api.keystore import requested_key
from queueing.catalog import Catalog, ModelSpec


def _dispatcher(request: Request) -> Dispatcher:
    return cast(Dispatcher, request.app.state.dispatcher)


def _catalog(request: Request) -> Catalog:
    return cast(Catalog, request.app.state.catalog)


def _redis(request: Request) -> aredis.Redis:
    return cast(aredis.Redis, request.app.state.redis)


def _files(request: Request) -> Files:
    return cast(Files, request.app.state.files)


def _owner(request: Request) -> str:
    # The key check (api/auth.py) already let this key in; what a key stores is partitioned by it.
    return owner_of(key_of(request.headers))


DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
OwnerDep = Annotated[str, Depends(_owner)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
RedisDep = Annotated[aredis.Redis, Depends(_redis)]
FilesDep = Annotated[Files, Depends(_files)]


def model_spec(catalog: Catalog, model: str) -> ModelSpec:
    """The catalog entry of a requested model, or the OpenAI 404 every route answers for an unknown one."""
    access_log.note_model(model)
    spec = catalog.get(model)
    key = requested_key.get()
    if spec is None or (key is not None and key.models is not None and model not in key.models):
        # A model the key may not call reads as one that does not exist, as OpenAI answers it.
        raise errors.model_not_found(model)
    return spec
