from __future__ import annotations

import time
from pathlib import Path

import pytest

from engines.base import (
    CacheStats,
    ContextLengthExceeded,
    Engine,
    GenerationRequest,
    Output,
    PrefixCacheHolder,
)
from engines.registry import UnknownEngine, create_engine
from engines.scripted import HELD_PROMPTS, PREFILL_ENV

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


def run(e: Engine, request: GenerationRequest) -> list[Output]:
    return list(e.generate(request))


def test_a_conversations_next_turn_is_served_from_the_simulated_prefix_cache(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    e = engine(monkeypatch, n_ctx=1000)
    turn1 = [{"role": "user", "content": "tell me a story about a fox " * 5}]
    first = run(e, GenerationRequest("t1", turn1, max_tokens=3))
    assert first[0].cached_tokens == 0 and first[-1].prompt_tokens == 7 * 5 + 4
    other = run(e, GenerationRequest("o", [{"role": "user", "content": "something else"}], max_tokens=1))
    assert other[-1].cached_tokens == 3  # the framing of a user message: what a chat template shares too
    reply = {"role": "assistant", "content": "once upon a time"}
    turn2 = [*turn1, reply, {"role": "user", "content": "more"}]
    second = run(e, GenerationRequest("t2", turn2, max_tokens=3))
    assert all(o.cached_tokens == first[-1].prompt_tokens for o in second)
    # The same prompt again: all but its last token, which a real engine evaluates again.
    again = run(e, GenerationRequest("t3", turn2, max_tokens=1))
    assert again[-1].cached_tokens == again[-1].prompt_tokens - 1
    # The words it says are the script's, whatever the cache held.
    assert [o.text for o in second] == [o.text for o in first]


def test_cache_stats_count_the_prompts_held_and_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    e = engine(monkeypatch)
    assert isinstance(e, PrefixCacheHolder) and e.cache_stats() == CacheStats(entries=0, bytes=0)
    run(e, GenerationRequest("a", [], max_tokens=1, prompt="one two"))
    run(e, GenerationRequest("b", [], max_tokens=1, prompt="one two"))  # the same prompt: one entry
    assert e.cache_stats() == CacheStats(entries=1, bytes=len("<s> one two"))
    for i in range(HELD_PROMPTS + 10):
        run(e, GenerationRequest(f"p{i}", [], max_tokens=1, prompt=f"prompt {i}"))
    assert e.cache_stats().entries == HELD_PROMPTS
    # The oldest went first: "one two" is no longer held.
    assert run(e, GenerationRequest("c", [], max_tokens=1, prompt="one two"))[-1].cached_tokens == 1


def test_prefill_time_is_paid_for_the_tokens_not_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFILL_ENV, "0.01")
    e = engine(monkeypatch, n_ctx=1000)
    long = [{"role": "user", "content": "word " * 60}]

    def first_word_after(request: GenerationRequest) -> float:
        outputs = e.generate(request)
        next(outputs)  # the prompt is accepted at once
        started = time.perf_counter()
        while not next(outputs).text:
            pass
        elapsed = time.perf_counter() - started
        list(outputs)
        return elapsed

    assert first_word_after(GenerationRequest("cold", long, max_tokens=2)) >= 0.64 * 0.95
    assert first_word_after(GenerationRequest("warm", long, max_tokens=2)) < 0.3


def test_an_abort_during_the_prefill_stops_it_within_a_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PREFILL_ENV, "0.01")
    e = engine(monkeypatch, n_ctx=1000)
    outputs = e.generate(GenerationRequest("cold", [{"role": "user", "content": "word " * 60}], max_tokens=2))
    assert next(outputs).prompt_tokens == 64
    assert next(outputs).text == ""  # one piece of the prompt evaluated (0.16 s), of four
    started = time.perf_counter()
    e.abort("cold")
    rest = list(outputs)
    assert [(o.text, o.finish_reason) for o in rest] == [("", "cancelled")]
    assert time.perf_counter() - started < 0.3  # the piece under way, not the 0.48 s left
