"""The management API's shapes (/v1/system/...): workers, models per worker, queues, and load requests."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from queueing.registry import ModelState, WorkerInfo


class WorkerView(WorkerInfo):
    fresh: bool = Field(description="Beat within two heartbeat intervals: routing may pick it.")
    assigned: int = Field(description="Jobs routed to its own queue and not started yet.")
    queue_depth: int = Field(description="Messages waiting in its own queue.")


class WorkerList(BaseModel):
    object: Literal["list"] = "list"
    data: list[WorkerView]


class ModelOnWorker(BaseModel):
    worker: str
    state: ModelState
    engine: str
    pinned: bool
    keep_alive: float | None
    last_used: float


class ModelFleetView(BaseModel):
    id: str
    workers: list[ModelOnWorker]
    capable: list[str] = Field(description="Live workers that could load it on demand.")
    routing: str
    queue_depth: int


class ModelFleetList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelFleetView]


class QueueDepth(BaseModel):
    queue: str
    kind: Literal["model", "worker"]
    depth: int


class QueueList(BaseModel):
    object: Literal["list"] = "list"
    data: list[QueueDepth]


class LoadRequest(BaseModel):
    worker: str | None = Field(None, description="Load on this worker; default: the best capable one.")
    pinned: bool = Field(False, description="Never evict it.")
    keep_alive: float | None = Field(None, description="Seconds idle before unloading; negative: never.")
    wait: bool = Field(False, description="Answer once the model is ready (bounded by INFERQ_LOAD_TIMEOUT).")


class UnloadRequest(BaseModel):
    worker: str | None = Field(None, description="Unload from this worker only; default: every worker.")


class PinRequest(BaseModel):
    worker: str | None = Field(None, description="Only this worker; default: every worker that has it.")
    pinned: bool = True


class ModelAction(BaseModel):
    model: str
    action: Literal["load", "unload", "pin", "unpin"]
    workers: list[str]
    state: ModelState | None = None
