"""The Files API objects (``/v1/files``), in the field order of the OpenAI reference."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int = Field(description="Size of the file in bytes.")
    created_at: int = Field(description="Unix time (seconds) the file was created.")
    filename: str
    purpose: str = Field(description="batch or user_data for uploads; batch_output for batch results.")
    # Files are usable as soon as the upload returns: there is no processing step.
    status: Literal["uploaded", "processed", "error"] = "processed"
    status_details: str | None = None
    expires_at: int | None = Field(None, description="Unix time (seconds) the file expires; None: never.")


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool
