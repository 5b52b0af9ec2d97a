"""GET /v1/models: OpenAI model objects plus where inferq serves them."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "inferq"
    # --- inferq extensions ---
    engine: str = Field(description="Engine(s) serving the model, comma-separated.")
    workers: list[str] = Field(description="Names of the live workers that serve the model.")
    context_length: int | None = None
    status: Literal["ready", "loading", "unloaded"] = Field(
        "ready", description="ready: a worker serves it; loading; unloaded: a worker can load it on demand."
    )


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
