"""The base of every OpenAI protocol model: unknown fields are accepted and logged once per name."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator

logger = logging.getLogger(__name__)
_seen_unknown: set[tuple[str, str]] = set()


class OpenAIBaseModel(BaseModel):
    # SDKs send new fields before servers know them; refusing them would break clients on every release.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in data.keys() - cls.model_fields.keys():
                if (cls.__name__, name) not in _seen_unknown:
                    _seen_unknown.add((cls.__name__, name))
                    logger.info("%s: ignoring unknown field %r", cls.__name__, name)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int


def check_stops(value: str | list[str] | None) -> list[str]:
    """``stop`` as chat and completions accept it: one string or up to 4, none empty."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops
