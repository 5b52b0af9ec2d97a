"""The llama.cpp adapter's prefix cache on the real SmolLM2 model: the KV state of recent generations kept in
RAM beyond the one the context holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from engines.base import CacheStats, Engine, GenerationRequest, Output, PrefixCacheHolder
from queueing.catalog import DEFAULT_CATALOG, Catalog
from tests import _engines

llamacpp = _engines.import_engine("llamacpp", "engines.llamacpp")

# ~300 tokens of a conversation's first turn; the second resends it with the answer and a new question.
NOTES = " ".join(f"Crate {i} holds {i * 7} apples and {i * 3} pears from the north." for i in range(16))
TURN1 = [{"role": "user", "content": f"My stock notes: {NOTES} Which crate holds the most pears?"}]
OTHER = [{"role": "user", "content": "Say hello."}]

Factory = Callable[[int], PrefixCacheHolder]


@pytest.fixture
def make() -> Iterator[Factory]:
    """A fresh engine with a RAM cache of this many MiB (its context empty), closed after the test."""
    spec = Catalog.load(DEFAULT_CATALOG).get("smollm2-135m")
    assert spec is not None
    made: list[Engine] = []

    def engine(cache_mib: int) -> PrefixCacheHolder:
        path = spec.sources["llamacpp"].resolve()
        made.append(llamacpp.LlamaCppEngine(path, n_ctx=1024, n_threads=1, cache_mib=cache_mib))
        holder = made[-1]
        assert isinstance(holder, PrefixCacheHolder)
        return holder

    yield engine
    for e in made:
        e.close()


def run(engine: PrefixCacheHolder, request: GenerationRequest) -> list[Output]:
    assert isinstance(engine, llamacpp.LlamaCppEngine)
    return list(engine.generate(request))


def second_turn_after_another_conversation(engine: PrefixCacheHolder) -> tuple[int, Output]:
    """Turn 1 of a conversation, another conversation (which the context then holds), turn 2 of the first:
    the length of turn 1's prompt, and the last output of turn 2."""
    first = run(engine, GenerationRequest("a1", TURN1, max_tokens=6, temperature=0))
    run(engine, GenerationRequest("b", OTHER, max_tokens=2, temperature=0))
    answer = "".join(o.text for o in first)
    turn2 = [*TURN1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the fewest?"}]
    second = run(engine, GenerationRequest("a2", turn2, max_tokens=2, temperature=0))
    assert all(o.cached_tokens == second[0].cached_tokens for o in second)
    return first[0].prompt_tokens, second[-1]


def test_a_conversation_finds_its_history_in_the_cache_after_another_used_the_context(make: Factory) -> None:
    turn1, second = second_turn_after_another_conversation(make(256))
    assert turn1 > 250
    assert turn1 - 2 <= second.cached_tokens < second.prompt_tokens


def test_without_the_ram_cache_only_the_context_is_reused(make: Factory) -> None:
    turn1, second = second_turn_after_another_conversation(make(0))
    # What the other conversation shares with it: the default system prompt of the chat template.
    assert 0 < second.cached_tokens < 50 < turn1


def test_a_seed_gives_the_same_text_cold_and_with_its_prompt_in_the_cache(make: Factory) -> None:
    engine = make(256)

    def seeded(rid: str) -> list[Output]:
        return run(engine, GenerationRequest(rid, TURN1, max_tokens=12, temperature=0.8, seed=5))

    cold = seeded("cold")
    run(engine, GenerationRequest("unseeded", TURN1, max_tokens=2))  # its state is kept: a hit was possible
    run(engine, GenerationRequest("other", OTHER, max_tokens=2))
    assert engine.cache_stats().entries >= 2
    warm = seeded("warm")
    assert "".join(o.text for o in warm) == "".join(o.text for o in cold) != ""
    assert [o.cached_tokens for o in warm] == [0] * len(warm)


def test_cache_stats_count_the_states_kept(make: Factory) -> None:
    engine = make(256)
    assert engine.cache_stats() == CacheStats(entries=0, bytes=0)
    run(engine, GenerationRequest("p1", [], max_tokens=1, prompt="The harbour at dawn was quiet."))
    one = engine.cache_stats()
    assert one.entries == 1 and one.bytes > 0
    run(engine, GenerationRequest("p2", [], max_tokens=1, prompt="Seven green bottles on a wall."))
    two = engine.cache_stats()
    assert two.entries == 2 and two.bytes > one.bytes
    # A prompt that extends a kept one replaces it: its state serves every prompt the shorter one served.
    longer = "The harbour at dawn was quiet. Then the boats came in."
    extended = run(engine, GenerationRequest("p3", [], max_tokens=1, prompt=longer))
    assert extended[-1].cached_tokens > 5
    assert engine.cache_stats().entries == 2


def test_a_small_capacity_keeps_only_what_fits(make: Factory) -> None:
    engine = make(1)  # MiB: the state of one ~30-token prompt (~23 KiB of KV cells a token) fits, two do not
    sea = "A prompt about the sea: its tides, its waves, the boats on it, the gulls above it, and the pier."
    snow = "Another prompt, about mountains: their snow, their wind, the goats on their slopes, and the huts."
    run(engine, GenerationRequest("s1", [], max_tokens=1, prompt=sea))
    one = engine.cache_stats()
    assert one.entries == 1 and 2**19 < one.bytes <= 2**20
    run(engine, GenerationRequest("s2", [], max_tokens=1, prompt=snow))
    assert engine.cache_stats().entries == 1 and engine.cache_stats().bytes <= 2**20
    # A state larger than the whole capacity is not kept; the context still holds it, and counts.
    big = run(engine, GenerationRequest("big", TURN1, max_tokens=1))
    assert big[0].prompt_tokens > 250
    assert engine.cache_stats() == CacheStats(entries=1, bytes=0)
