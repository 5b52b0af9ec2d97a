"""Request dependencies: the long-lived objects the lifespan put on ``app.state``."""

from __future__ import annotations

from typing import Annotated, cast

import redis.asyncio as aredis
from fastapi import Depends, Request

from api import errors
from api.files import Files
from api.jobs import Dispatcher
from queueing.catalog import Catalog, ModelSpec


def _dispatcher(request: Request) -> Dispatcher:
    return cast(Dispatcher, request.app.state.dispatcher)


def _catalog(request: Request) -> Catalog:
    return cast(Catalog, request.app.state.catalog)


def _redis(request: Request) -> aredis.Redis:
    return cast(aredis.Redis, request.app.state.redis)


def _files(request: Request) -> Files:
    return cast(Files, request.app.state.files)


DispatcherDep = Annotated[Dispatcher, Depends(_dispatcher)]
CatalogDep = Annotated[Catalog, Depends(_catalog)]
RedisDep = Annotated[aredis.Redis, Depends(_redis)]
FilesDep = Annotated[Files, Depends(_files)]


def model_spec(catalog: Catalog, model: str) -> ModelSpec:
    """The catalog entry of a requested model, or the OpenAI 404 every route answers for an unknown one."""
    spec = catalog.get(model)
    if spec is None:
        raise errors.model_not_found(model)
    return spec
