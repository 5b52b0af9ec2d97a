"""The llama.cpp adapter in-process on the real SmolLM2 model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from engines.base import ContextLengthExceeded, Engine, GenerationRequest
from queueing.catalog import DEFAULT_CATALOG, Catalog

llamacpp = pytest.importorskip("engines.llamacpp")
MSG = [{"role": "user", "content": "Count from one to twenty in words."}]


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    spec = Catalog.load(DEFAULT_CATALOG).get("smollm2-135m")
    assert spec is not None
    e: Engine = llamacpp.LlamaCppEngine(spec.sources["llamacpp"].resolve(), n_ctx=256, n_threads=1)
    yield e
    e.close()


def test_first_output_reports_the_prompt_then_text_then_finish(engine: Engine) -> None:
    outs = list(engine.generate(GenerationRequest("r1", MSG, max_tokens=8, temperature=0)))
    assert outs[0].text == "" and outs[0].prompt_tokens > 10 and outs[0].finish_reason is None
    assert outs[-1].finish_reason in ("stop", "length")
    assert outs[-1].completion_tokens <= 8
    assert all(o.finish_reason is None for o in outs[:-1])


def test_prompt_over_context_raises_before_any_output(engine: Engine) -> None:
    long = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(ContextLengthExceeded) as info:
        next(engine.generate(GenerationRequest("r2", long, max_tokens=8)))
    assert info.value.limit == 256 and info.value.prompt_tokens > 256


def test_max_tokens_is_clamped_to_the_context_left(engine: Engine) -> None:
    outs = list(
        engine.generate(GenerationRequest("r3", MSG, max_tokens=10_000, ignore_eos=True, temperature=0))
    )
    assert outs[-1].finish_reason == "length"
    assert outs[0].prompt_tokens + outs[-1].completion_tokens == 256


def test_abort_stops_a_running_generation(engine: Engine) -> None:
    gen = engine.generate(GenerationRequest("r4", MSG, max_tokens=200, ignore_eos=True))
    next(gen)
    next(gen)
    engine.abort("r4")
    rest = list(gen)
    assert rest[-1].finish_reason == "cancelled"
    assert rest[-1].completion_tokens < 200
