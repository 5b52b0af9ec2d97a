"""Embeddings (POST /v1/embeddings)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from api.protocol.base import OpenAIBaseModel

_Text = Annotated[str, Field(min_length=1)]
_Tokens = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
# OpenAI's limit on inputs per request.
_MAX_INPUTS = 2048


class EmbeddingRequest(OpenAIBaseModel):
    input: (
        _Text
        | Annotated[list[_Text], Field(min_length=1, max_length=_MAX_INPUTS)]
        | _Tokens
        | Annotated[list[_Tokens], Field(min_length=1, max_length=_MAX_INPUTS)]
    ) = Field(description="A text, a list of texts, a token array or a list of token arrays.")
    model: str = Field(description="A model id whose catalog entry has `embeddings: true`.")
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="`base64`: little-endian float32 bytes, base64-encoded."
    )
    dimensions: int | None = Field(None, ge=1, description="Not supported: must be unset.")
    user: str | None = None

    def inputs(self) -> list[str] | list[list[int]]:
        value = self.input
        if isinstance(value, str):
            return [value]
        if all(isinstance(v, int) for v in value):
            return [[v for v in value if isinstance(v, int)]]
        if all(isinstance(v, str) for v in value):
            return [v for v in value if isinstance(v, str)]
        return [v for v in value if isinstance(v, list)]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
