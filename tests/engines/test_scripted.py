from __future__ import annotations

from pathlib import Path

import pytest

from engines.base import ContextLengthExceeded, Engine, GenerationRequest
from engines.registry import UnknownEngine, create_engine

MSG = [{"role": "user", "content": "hello there"}]


def engine(monkeypatch: pytest.MonkeyPatch, n_ctx: int = 100) -> Engine:
    monkeypatch.setenv("INFERQ_SCRIPTED_TOKENS_PER_SECOND", "5000")
    return create_engine("scripted", model_path=Path("/dev/null"), n_ctx=n_ctx)


def test_generates_exactly_max_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    outs = list(engine(monkeypatch).generate(GenerationRequest("a", MSG, max_tokens=7)))
    assert outs[0].prompt_tokens == 6 and outs[0].text == ""
    assert sum(1 for o in outs if o.text) == 7
    assert (outs[-1].finish_reason, outs[-1].completion_tokens) == ("length", 7)


def test_abort_and_context(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(monkeypatch, n_ctx=5)
    with pytest.raises(ContextLengthExceeded):
        next(e.generate(GenerationRequest("b", MSG, max_tokens=1)))
    e = engine(monkeypatch)
    gen = e.generate(GenerationRequest("c", MSG, max_tokens=1000))
    next(gen)
    e.abort("c")
    assert list(gen)[-1].finish_reason == "cancelled"


def test_unknown_engine_names_the_known_ones() -> None:
    with pytest.raises(UnknownEngine, match="llamacpp"):
        create_engine("nope")
