"""The llama.cpp adapter in-process on the real SmolLM2 model."""

from __future__ import annotations

import json
import math
import threading

import jsonschema
import pytest

from engines.base import (
    PREFILL_CHUNK_TOKENS,
    ContextLengthExceeded,
    Embedder,
    Engine,
    GenerationRequest,
    UnsupportedRequest,
)
from tests import _engines
from workers.engine_io import close_outputs

llamacpp = _engines.import_engine("llamacpp", "engines.llamacpp")
Jinja2ChatFormatter = _engines.import_engine("llamacpp", "llama_cpp.llama_chat_format").Jinja2ChatFormatter
MSG = [{"role": "user", "content": "Count from one to twenty in words."}]


@pytest.fixture(scope="module")
def engine(smollm2_engine: Engine) -> Engine:
    return smollm2_engine


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


def test_abort_during_the_prompt_stops_before_the_rest_of_it_is_evaluated(engine: Engine) -> None:
    # A new prompt (no cached prefix: the context holds another), evaluated in pieces with an empty output
    # after each: the reader's abort there ends it with no token, the rest of the prompt unevaluated.
    long = [{"role": "user", "content": " ".join(f"word{i}" for i in range(60))}]
    gen = engine.generate(GenerationRequest("r-pre", long, max_tokens=8, seed=1))
    first = next(gen)
    assert first.prompt_tokens > 4 * PREFILL_CHUNK_TOKENS and first.cached_tokens == 0
    piece = next(gen)
    assert piece.text == "" and piece.finish_reason is None
    engine.abort("r-pre")
    rest = list(gen)
    assert [(o.text, o.finish_reason, o.completion_tokens) for o in rest] == [("", "cancelled", 0)]
    # The next generation is not disturbed by the half-evaluated context.
    again = list(engine.generate(GenerationRequest("r-pre2", MSG, max_tokens=4, temperature=0)))
    assert again[-1].finish_reason in ("stop", "length") and "".join(o.text for o in again)


def test_raw_prompt_skips_the_chat_template(engine: Engine) -> None:
    outs = list(
        engine.generate(GenerationRequest("r5", [], max_tokens=4, temperature=0, prompt="Paris is in"))
    )
    assert outs[0].prompt_tokens == 3
    with pytest.raises(UnsupportedRequest):
        next(engine.generate(GenerationRequest("r6", [], max_tokens=4, prompt="")))


@pytest.mark.parametrize("seed", range(5))
def test_json_schema_constrains_the_output(engine: Engine, seed: int) -> None:
    # Every document of this schema is short, so the grammar alone guarantees a complete one.
    schema = {
        "type": "object",
        "properties": {
            "n": {"type": "integer"},
            "ok": {"type": "boolean"},
            "size": {"enum": ["s", "m", "l"]},
        },
        "required": ["n", "ok", "size"],
    }
    request = GenerationRequest("r7", MSG, max_tokens=100, temperature=1.0, seed=seed, json_schema=schema)
    outs = list(engine.generate(request))
    assert outs[-1].finish_reason == "stop"
    jsonschema.validate(json.loads("".join(o.text for o in outs)), schema)


def test_free_text_fields_validate_whenever_the_document_ends(engine: Engine) -> None:
    # Strings and arrays are unbounded: a small model can run out of tokens inside one (finish "length").
    schema = {
        "type": "object",
        "properties": {"words": {"type": "array", "items": {"type": "string"}}},
        "required": ["words"],
    }
    ended = 0
    for seed in range(4):
        request = GenerationRequest(
            "r7b", MSG, max_tokens=150, temperature=0.7, seed=seed, json_schema=schema
        )
        outs = list(engine.generate(request))
        if outs[-1].finish_reason == "stop":
            ended += 1
            jsonschema.validate(json.loads("".join(o.text for o in outs)), schema)
    assert ended > 0


def test_an_empty_schema_means_any_json_object(engine: Engine) -> None:
    ask = [{"role": "user", "content": "Describe a cat called Tom, aged 3, as a JSON object."}]
    ended = 0
    for seed in range(3):
        outs = list(engine.generate(GenerationRequest("r8", ask, max_tokens=200, seed=seed, json_schema={})))
        assert "".join(o.text for o in outs).startswith("{")
        if outs[-1].finish_reason == "stop":
            ended += 1
            assert isinstance(json.loads("".join(o.text for o in outs)), dict)
    assert ended > 0


def test_a_schema_without_a_grammar_is_refused(engine: Engine) -> None:
    with pytest.raises(UnsupportedRequest) as info:
        next(engine.generate(GenerationRequest("r9", MSG, max_tokens=4, json_schema={"type": "frobnicate"})))
    assert info.value.param == "response_format"


def test_logprobs_of_each_token_and_its_alternatives(engine: Engine) -> None:
    outs = list(engine.generate(GenerationRequest("r10", MSG, max_tokens=5, temperature=0, logprobs=3)))
    tokens = [t for o in outs for t in o.logprobs or []]
    assert len(tokens) == 5
    assert "".join(t.token for t in tokens) == "".join(o.text for o in outs)
    for t in tokens:
        assert len(t.top) == 3 and t.top[0][1] == pytest.approx(t.logprob)  # greedy: the most likely
        assert t.top[0][1] >= t.top[1][1] >= t.top[2][1]
        assert math.exp(t.logprob) <= 1.0
    none = list(engine.generate(GenerationRequest("r11", MSG, max_tokens=3, temperature=0)))
    assert all(o.logprobs is None for o in none)


def test_embeddings_are_normalised_and_tokens_equal_their_text(engine: Engine) -> None:
    assert isinstance(engine, Embedder)
    got = engine.embed(["hello world", "the cat sat"])
    tokens = engine.embed([[28120, 905]])
    assert len(got.vectors) == 2 and got.prompt_tokens == 2 + 3 and tokens.prompt_tokens == 2
    for v in got.vectors:
        assert sum(x * x for x in v) == pytest.approx(1.0, abs=1e-6)
    assert got.vectors[0] == pytest.approx(tokens.vectors[0], abs=1e-6)
    assert got.vectors[0] != pytest.approx(got.vectors[1], abs=1e-3)
    for bad in ([""], [[10**9]]):
        with pytest.raises(UnsupportedRequest):
            engine.embed(bad)
    with pytest.raises(ContextLengthExceeded):
        engine.embed(["word " * 400])


def test_messages_the_chat_template_refuses_are_unsupported(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    strict = Jinja2ChatFormatter(
        template="{{ raise_exception('roles must alternate') }}", eos_token="", bos_token=""
    )
    monkeypatch.setattr(engine, "_formatter", strict)
    with pytest.raises(UnsupportedRequest) as info:
        next(engine.generate(GenerationRequest("r12", MSG, max_tokens=2)))
    assert info.value.param == "messages" and "roles must alternate" in str(info.value)


def test_a_seed_gives_the_same_text_whatever_ran_before(engine: Engine) -> None:
    other = [{"role": "user", "content": "Something else entirely."}]
    sea = [{"role": "user", "content": "Write one sentence about the sea."}]

    def sample(messages: list[dict[str, str]], seed: int) -> str:
        request = GenerationRequest("r13", messages, max_tokens=8, temperature=0.7, top_p=0.9, seed=seed)
        return "".join(o.text for o in engine.generate(request))

    # Seen to differ when the second run reused the cached prompt (its last token evaluated alone).
    sample(other, 1)
    after_other = sample(sea, 11)
    after_same = sample(sea, 11)  # the whole prompt is in the cache now
    assert after_other == after_same


def test_a_generation_closed_mid_stream_frees_the_engine_for_the_next(engine: Engine) -> None:
    # The worker's runner closes a generation it stops reading (a Redis error, a cancel): the engine lock
    # is released there, not whenever the garbage collector gets to the suspended generator.
    gen = engine.generate(GenerationRequest("r-closed", MSG, max_tokens=100, ignore_eos=True))
    next(gen)
    next(gen)
    close_outputs(gen)  # what the runner does; ``gen`` stays referenced, as a kept traceback would
    done: list[int] = []

    def again() -> None:
        outs = list(engine.generate(GenerationRequest("r-next", MSG, max_tokens=2, temperature=0)))
        done.append(outs[-1].completion_tokens)

    t = threading.Thread(target=again, daemon=True)
    t.start()
    t.join(30)
    assert done, "the closed generation still holds the engine"


def test_a_prompt_the_context_still_holds_reports_its_cached_tokens(engine: Engine) -> None:
    turn1 = [{"role": "user", "content": "Name three colours of the rainbow."}]
    first = list(engine.generate(GenerationRequest("r-c1", turn1, max_tokens=6, temperature=0)))
    answer = "".join(o.text for o in first)
    # The next turn resends the history: everything up to the new message is in the KV state already.
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And two more?"}]
    second = list(engine.generate(GenerationRequest("r-c2", turn2, max_tokens=4, temperature=0)))
    shared = first[0].prompt_tokens
    assert shared - 2 <= second[-1].cached_tokens < second[-1].prompt_tokens
    assert all(o.cached_tokens == second[0].cached_tokens for o in second)
    # The same prompt again: all of it but the last token, which is evaluated again for fresh logits.
    again = list(engine.generate(GenerationRequest("r-c3", turn2, max_tokens=2, temperature=0)))
    assert again[-1].cached_tokens == again[-1].prompt_tokens - 1
    # A seeded request evaluates its whole prompt (the seed test above says why), and says so.
    seeded = list(engine.generate(GenerationRequest("r-c4", turn2, max_tokens=2, seed=3)))
    assert seeded[-1].cached_tokens == 0
