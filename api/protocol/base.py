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
