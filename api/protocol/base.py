"""The base of every OpenAI protocol model: unknown fields are accepted and logged once per name."""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from queueing.catalog import ModelSpec
from queueing.jobs import Sampling

# The processing tiers an OpenAI answer reports serving it in (api/priority.py maps inferq's classes to them).
ServiceTier = Literal["flex", "default", "priority"]

logger = logging.getLogger(__name__)

# Unknown field names already logged, as (model, name). Bounded: a client can send any number of names, and
# what it sends must neither grow this set for ever nor write a log line per name.
_seen_unknown: set[tuple[str, str]] = set()
_MAX_REMEMBERED = 512
_NAMED_PER_LINE = 5
_NAME_CHARS = 64


def _note_unknown(model: str, names: set[str]) -> None:
    """One log line per model and request for the unknown names not logged before; once the set is full,
    one last line, and no more."""
    if len(_seen_unknown) >= _MAX_REMEMBERED:
        return
    new = sorted({n[:_NAME_CHARS] for n in names} - {n for m, n in _seen_unknown if m == model})
    if not new:
        return
    room = _MAX_REMEMBERED - len(_seen_unknown)
    _seen_unknown.update((model, n) for n in new[:room])
    shown = ", ".join(repr(n) for n in new[:_NAMED_PER_LINE])
    more = f" and {len(new) - _NAMED_PER_LINE} more" if len(new) > _NAMED_PER_LINE else ""
    logger.info("%s: ignoring unknown field%s %s%s", model, "s" if len(new) > 1 else "", shown, more)
    if len(_seen_unknown) >= _MAX_REMEMBERED:
        logger.info(
            "%d unknown field names logged, as many as are kept; new ones go unlogged", _MAX_REMEMBERED
        )


# Counts a request may hold (the body size, api.input_limits, bounds the rest): far above any real
# conversation, far below what costs the API memory and a worker's chat template its time.
MAX_ITEMS = 10_000
MAX_STOP_SEQUENCES = 64


class OpenAIBaseModel(BaseModel):
    # SDKs send new fields before servers know them; refusing them would break clients on every release.
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _log_unknown(cls, data: Any) -> Any:
        if isinstance(data, dict):
            known = {f.alias or n for n, f in cls.model_fields.items()} | cls.model_fields.keys()
            unknown = {n for n in data.keys() - known if isinstance(n, str)}
            if unknown:
                _note_unknown(cls.__name__, unknown)
        return data


class StreamOptions(OpenAIBaseModel):
    include_usage: bool = False


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int = 0
    total_tokens: int
    # As OpenAI reports it: the prompt tokens served from the engine's prefix cache.
    prompt_tokens_details: PromptTokensDetails | None = None


def check_stops(value: str | list[str] | None) -> list[str]:
    """``stop`` as chat and completions accept it: one string or up to 4, none empty."""
    stops = [value] if isinstance(value, str) else list(value or [])
    if len(stops) > 4:
        raise ValueError("at most 4 stop sequences are allowed")
    if any(not s for s in stops):
        raise ValueError("stop sequences must not be empty")
    return stops


class SamplingRequest(OpenAIBaseModel):
    """The sampling fields chat and completions share, and their conversion into the queue's neutral
    sampling values (with the catalog model's defaults for what the request leaves unset)."""

    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, description="Same seed, same parameters: the same output.")
    stop: str | list[str] | None = Field(None, description="Up to 4 sequences where generation stops.")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, ge=0.0, le=1.0)

    # --- inferq extensions (as vLLM accepts them) ---
    top_k: int | None = Field(None, ge=0, description="Sample from the k most likely tokens; 0 disables.")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = Field(False, description="Keep generating past the end-of-sequence token.")

    _stops = field_validator("stop")(check_stops)

    def sampling(self, spec: ModelSpec, max_tokens: int, **extra: Any) -> Sampling:
        d = spec.defaults
        return Sampling(
            max_tokens=max_tokens,
            temperature=d.temperature if self.temperature is None else self.temperature,
            top_p=d.top_p if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            stop=self.stop if isinstance(self.stop, list) else [],
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            ignore_eos=self.ignore_eos,
            **extra,
        )
