"""Soak: mixed traffic through every protocol for a long while, with workers killed (``kill -9``) now and
then and Redis restarted empty once, and an account of every request.

    .venv/bin/python bench/soak.py [--duration 600] [--workers 3] [--kill-every 40] [--redis-restart-at T]
                                   [--engine llamacpp|scripted] [--concurrency 6] [--max-tokens 16] [--seed 0]

A private Redis, one API process and ``--workers`` worker processes (tests/fleet.py) serve ``smollm2-135m`` on
llama.cpp (one thread each: 3 llama.cpp workers share the 2 cores, so generations are kept short with
``--max-tokens``) or, with ``--engine scripted``, a scripted model at a fixed speed (no embeddings there).
Heartbeats are a real deployment's (``--heartbeat-ttl`` 4 s, every 1 s), not tests/fleet.py's quick 2 s.
``--concurrency`` client threads send requests one after another (pausing a random ``--think`` seconds on
average between them, and ``--backoff`` seconds after a failure, as a client would), each of a kind drawn at
random: chat completions (openai SDK, and streamed as raw SSE), completions (SDK, and streamed as raw SSE),
embeddings (SDK), Responses (SDK, plain and streamed) and Anthropic Messages (anthropic SDK, plain and
streamed); and every ``--batch-every`` seconds a batch of ``--batch-lines`` chat lines (Files and Batch API)
is submitted and followed to its end. Every request carries a unique marker (``soak-<run>-<n>``; line k of a
batch ``soak-<run>-<n>.k``) in its prompt or input, which the worker side finds again in the job's record.

Faults: every ``--kill-every`` seconds a random worker is killed with SIGKILL and started again a second
later, as ``inferq up`` does (alternately under the same name, which recovers its previous life's jobs at
start, and under a new one, whose dead predecessor's jobs the live workers take back once its heartbeat
expires). At ``--redis-restart-at`` seconds Redis is stopped and, ``--redis-down`` seconds later, started
again on the same port with nothing kept. No kill falls within 10 s of the Redis restart, so that each
failure can be told apart.

What every request ends as (client side):
- completed: a full answer. Plain: HTTP 200 with its body. Streamed: HTTP 200 and the protocol's last event
  ([DONE] after a chunk with a ``finish_reason`` on chat/completions, ``response.completed`` or
  ``response.incomplete`` on Responses, ``message_stop`` on Messages). A batch: it ended ``completed``, every
  line answered 200 and each ``custom_id`` in exactly one result line (a line twice is a duplicate).
- failed, by reason: an explicit error. A non-200 status with its error code (``503 redis_unavailable``
  while Redis is away is expected and reported, not a loss), or, once a stream had started, the protocol's
  error event with its code (``stream error worker_lost`` when the worker died after sending text); a
  stream error not followed by the protocol's sentinel is marked ``(no sentinel)``.
- lost: the request was sent and never got a final answer or an error: a stream cut without its last event
  or an error event, a connection closed without an answer, or no answer at all within the client timeout
  (``--request-timeout`` + 30 s, or still open ``--request-timeout`` + 60 s after the traffic stopped); a
  batch not ended by then, or ended without a result line for one of its lines. Must be 0. (A request
  answered only at its deadline, 504 ``timeout``, is failed, not lost, and is listed one by one: it hung.)

Worker side (duplicates): a monitor subscribes to every job's pub/sub channel (``inferq:stream:*``) and keeps,
per job id, its ``started`` events (attempt, worker) and its ``finished`` events; on a job's first ``started``
it reads the job record's payload for the request's marker. A request is duplicated when its job published
``finished`` more than once, or was started again after it had finished, or when more than one job carrying
its marker finished (every request here is one job). Must be 0. Events published while Redis is away are lost
for everyone (pub/sub), so the monitor cannot see a run that falls wholly into the outage; the worker logs'
counts of re-queued jobs and skipped stale deliveries are printed beside it, and so are the job records still
queued or running after the traffic drained (a stranded job; should be 0). The details of every lost,
duplicated or timed-out request name its jobs as the monitor saw them and the job records left at the end.

Text: the monitor also joins each attempt's ``delta`` events. A completed stream whose text is not exactly its
job's last attempt's deltas (text sent twice, or a piece missing) is listed; streams in flight across the
Redis restart are left out of that comparison (the monitor misses events while it reconnects).

The exit status is 1 when anything was lost or duplicated, or a stream's text was not the worker's.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import random
import re
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import anthropic
import httpx
import openai
import redis
from openai.types import Batch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ops.redis_server import RedisServer  # noqa: E402
from queueing import keys  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

SCRIPTED_CATALOG = (
    "models:\n  scripted:\n    context_length: 4096\n    sources:\n      scripted: {path: %s}\n"
)
# Seconds around the Redis restart in which no worker is killed, and after a fault in which a failure is
# counted as that fault's.
QUIET = 10.0
MARKER = re.compile(r"soak-[0-9a-f]{6}-\d+(?:\.\d+)?")  # .k: line k of a batch
PROMPTS = (
    "Say hello to a friend.",
    "Name a colour.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Give a short tip for cooking rice.",
)


def common_prefix(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def request_of(marker: str) -> str:
    """The request a marker belongs to: line k of a batch (``<batch marker>.k``) to its batch."""
    return marker.split(".")[0] if marker else "?"


@dataclass
class Outcome:
    """One request, from the client's side."""

    n: int
    kind: str
    marker: str
    sent: float  # seconds since the start of the run
    ended: float | None = None
    status: str = "open"  # open | completed | failed | lost
    reason: str = ""
    worker: str = ""
    # Streams: the text the client received, to compare with what the worker generated.
    text: str | None = None


@dataclass
class JobSeen:
    """One job, from the worker side (its pub/sub events)."""

    marker: str = ""
    # Seconds since the start of the run, as the monitor received each event.
    started: list[tuple[int, str, float]] = field(default_factory=list)  # (attempt, worker, at)
    finished: list[tuple[int, float]] = field(default_factory=list)  # (attempt, at)
    errors: list[tuple[str, float]] = field(default_factory=list)  # (code, at)
    restarted_after_finish: bool = False
    # The text of each attempt's delta events, joined.
    text: dict[int, str] = field(default_factory=dict)


class Failed(Exception):
    """The request ended with an explicit error (its reason)."""


class Lost(Exception):
    """The request ended with neither an answer nor an error (why)."""


@dataclass
class Clients:
    base: str
    timeout: float
    oa: openai.OpenAI
    an: anthropic.Anthropic
    raw: httpx.Client


def status_reason(status: int, code: object) -> str:
    return f"{status} {code or '-'}"


def openai_error(exc: openai.APIStatusError) -> Failed:
    return Failed(status_reason(exc.status_code, exc.code))


def anthropic_error(exc: anthropic.APIStatusError) -> Failed:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error")
    error = error if isinstance(error, dict) else {}
    return Failed(status_reason(exc.status_code, error.get("type")))


def raw_stream(c: Clients, path: str, body: dict[str, object], o: Outcome) -> None:
    """Chat completions or completions streamed, read as plain SSE: the sentinel is seen, not inferred."""
    error: str | None = None
    finish = False
    o.text = ""
    deadline = time.monotonic() + c.timeout
    with c.raw.stream("POST", path, json=body) as r:
        o.worker = r.headers.get("x-inferq-worker", "")
        if r.status_code != 200:
            r.read()
            try:
                code = r.json()["error"]["code"]
            except (ValueError, KeyError, TypeError):
                code = "?"
            raise Failed(status_reason(r.status_code, code))
        for line in r.iter_lines():
            if time.monotonic() > deadline:
                raise Lost("stream open past the client timeout")
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                if error is not None:
                    raise Failed(f"stream error {error}")
                if not finish:
                    raise Lost("[DONE] without a finish_reason")
                return
            chunk = json.loads(data)
            if "error" in chunk:
                error = str(chunk["error"].get("code") or chunk["error"].get("type"))
                continue
            for ch in chunk.get("choices", []):
                piece = (ch.get("delta") or {}).get("content") if "delta" in ch else ch.get("text")
                o.text = (o.text or "") + (piece or "")
                finish = finish or bool(ch.get("finish_reason"))
    if error is not None:
        raise Failed(f"stream error {error} (no sentinel)")
    raise Lost("stream cut: no [DONE] and no error event")


def do_chat(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        c.oa.chat.completions.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, user=o.marker
        )
    except openai.APIStatusError as exc:
        raise openai_error(exc) from None


def do_chat_stream(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    body: dict[str, object] = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "user": o.marker,
    }
    raw_stream(c, "/v1/chat/completions", body, o)


def do_completion(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        c.oa.completions.create(model=model, prompt=prompt, max_tokens=max_tokens)
    except openai.APIStatusError as exc:
        raise openai_error(exc) from None


def do_completion_stream(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    body: dict[str, object] = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True}
    raw_stream(c, "/v1/completions", body, o)


def do_embedding(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        got = c.oa.embeddings.create(model=model, input=prompt)
    except openai.APIStatusError as exc:
        raise openai_error(exc) from None
    if len(got.data) != 1 or not got.data[0].embedding:
        raise Lost("an embeddings answer without its vector")


def do_responses(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        c.oa.responses.create(model=model, input=prompt, max_output_tokens=max_tokens)
    except openai.APIStatusError as exc:
        raise openai_error(exc) from None


def do_responses_stream(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    error: str | None = None
    try:
        stream = c.oa.responses.create(model=model, input=prompt, max_output_tokens=max_tokens, stream=True)
        with stream:
            o.text = ""
            for event in stream:
                if event.type == "response.output_text.delta":
                    o.text += event.delta
                elif event.type == "error":
                    error = str(event.code)
                elif event.type == "response.failed":
                    raise Failed(f"stream error {error or 'response.failed'}")
                elif event.type in ("response.completed", "response.incomplete"):
                    return
    except openai.APIStatusError as exc:
        raise openai_error(exc) from None
    if error is not None:
        raise Failed(f"stream error {error} (no sentinel)")
    raise Lost("stream cut: no response.completed/failed and no error event")


def do_messages(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        c.an.messages.create(
            model=model,
            max_tokens=max_tokens,
            messages=[{"role": "user", "content": prompt}],
            metadata={"user_id": o.marker},
        )
    except anthropic.APIStatusError as exc:
        raise anthropic_error(exc) from None


def do_messages_stream(c: Clients, model: str, prompt: str, o: Outcome, max_tokens: int) -> None:
    try:
        stream = c.an.messages.create(
            model=model, max_tokens=max_tokens, messages=[{"role": "user", "content": prompt}], stream=True
        )
        with stream:
            o.text = ""
            for event in stream:
                if event.type == "content_block_delta" and event.delta.type == "text_delta":
                    o.text += event.delta.text
                elif event.type == "message_stop":
                    return
    except anthropic.APIStatusError as exc:
        # An error event in the stream arrives here too (the SDK raises it), as does a non-200 status.
        if exc.status_code != 200:
            raise anthropic_error(exc) from None
        body = exc.body if isinstance(exc.body, dict) else {}
        error = body.get("error")
        raise Failed(f"stream error {error.get('type') if isinstance(error, dict) else '?'}") from None
    raise Lost("stream cut: no message_stop and no error event")


Kind = Callable[[Clients, str, str, Outcome, int], None]
KINDS: dict[str, Kind] = {
    "chat": do_chat,
    "chat stream": do_chat_stream,
    "completion": do_completion,
    "completion stream": do_completion_stream,
    "embedding": do_embedding,
    "responses": do_responses,
    "responses stream": do_responses_stream,
    "messages": do_messages,
    "messages stream": do_messages_stream,
}


class Monitor(threading.Thread):
    """Follows every job's events on Redis pub/sub (reconnecting through the Redis restart)."""

    def __init__(self, redis_url: str, clock: Callable[[], float]) -> None:
        super().__init__(daemon=True)
        self.url = redis_url
        self.clock = clock
        self.jobs: dict[str, JobSeen] = defaultdict(JobSeen)
        self.reconnects = 0
        self.done = threading.Event()
        self.lock = threading.Lock()

    def run(self) -> None:
        while not self.done.is_set():
            client = redis.Redis.from_url(self.url, socket_timeout=2.0, socket_connect_timeout=1.0)
            try:
                pubsub = client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis-py 8
                pubsub.psubscribe(f"{keys.STREAM_PREFIX}*")
                while not self.done.is_set():
                    message = pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "pmessage":
                        self._seen(client, message["channel"].decode(), message["data"])
            except (redis.ConnectionError, redis.TimeoutError):
                self.reconnects += 1
                time.sleep(0.2)
            finally:
                with contextlib.suppress(redis.RedisError):
                    client.close()

    def _seen(self, client: redis.Redis, channel: str, data: bytes) -> None:
        job_id = channel[len(keys.STREAM_PREFIX) :]
        event = json.loads(data)
        at = round(self.clock(), 2)
        with self.lock:
            seen = self.jobs[job_id]
            if event["type"] == "started":
                if seen.finished:
                    seen.restarted_after_finish = True
                seen.started.append((event["attempt"], event["worker"], at))
                need_marker = not seen.marker
            elif event["type"] == "delta":
                attempt = event["attempt"]
                seen.text[attempt] = seen.text.get(attempt, "") + event["text"]
                need_marker = False
            elif event["type"] == "finished":
                seen.finished.append((event["attempt"], at))
                need_marker = False
            elif event["type"] == "error":
                seen.errors.append((str(event.get("code")), at))
                need_marker = False
            else:
                need_marker = False
        if need_marker:
            payload = client.hget(keys.job_key(job_id), "payload")
            found = MARKER.search(payload.decode(errors="replace")) if isinstance(payload, bytes) else None
            with self.lock:
                seen.marker = found.group(0) if found else "?"


@dataclass
class Timeline:
    """The faults, in seconds since the start of the run."""

    kills: list[tuple[float, str]] = field(default_factory=list)
    redis_down: float | None = None
    redis_up: float | None = None
    unexpected_exits: list[tuple[float, str, int]] = field(default_factory=list)

    def during(self, sent: float, ended: float) -> str:
        """Which fault a request that was in flight from ``sent`` to ``ended`` met: the Redis restart
        (from its stop to 10 s after Redis was back), a kill (up to 10 s after it), or none."""
        if self.redis_down is not None:
            up = self.redis_up if self.redis_up is not None else ended
            if sent <= up + QUIET and ended >= self.redis_down:
                return "redis"
        if any(sent <= k + QUIET and ended >= k for k, _ in self.kills):
            return "kill"
        return "other"


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.run_id = f"{random.Random(args.seed).getrandbits(24):06x}"
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.counter = 0
        self.t0 = 0.0
        self.timeline = Timeline()
        self.stop = threading.Event()
        self.tmp = Path(tempfile.mkdtemp(prefix="inferq-soak-"))
        self.model = "smollm2-135m" if args.engine == "llamacpp" else "scripted"
        self.kinds = [k for k in KINDS if not (k == "embedding" and args.engine == "scripted")]
        self.generation: dict[str, int] = {}
        self.killed_by_us: set[int] = set()
        # Duplicates a client can see (a batch's result file holding a line twice), by marker.
        self.client_dups: dict[str, list[str]] = defaultdict(list)
        self.drain_deadline = float("inf")
        # What the job records left at the end say, by request marker (filled by ``stranded``).
        self.records: dict[str, list[str]] = defaultdict(list)

    def now(self) -> float:
        return time.monotonic() - self.t0

    # ---- the fleet
    def start_worker(self, fleet: Fleet, name: str) -> None:
        if self.args.engine == "scripted":
            args = ["--engine", "scripted", "--concurrency", "2"]
            env = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "50"}
        else:
            args, env = ["--engine", "llamacpp"], {}
        fleet.start_worker(name, self.model, wait=False, args=args, env=env)

    def kill_one(self, fleet: Fleet, kills: int) -> None:
        name = self.rng.choice(sorted(fleet.workers))
        proc = fleet.workers[name]
        self.killed_by_us.add(proc.pid)
        fleet.kill_worker(name, signal.SIGKILL)
        self.timeline.kills.append((self.now(), name))
        time.sleep(1.0)  # inferq up notices a dead child within its poll
        if kills % 2 == 0:
            base = name.split("-")[0]
            self.generation[base] = self.generation.get(base, 0) + 1
            name = f"{base}-{self.generation[base]}"
        self.start_worker(fleet, name)

    def supervise(self, fleet: Fleet) -> None:
        """Restarts a worker that exited on its own (not one this script killed), as inferq up would."""
        for name, proc in list(fleet.workers.items()):
            code = proc.poll()
            if code is not None and proc.pid not in self.killed_by_us:
                self.timeline.unexpected_exits.append((self.now(), name, code))
                del fleet.workers[name]
                self.start_worker(fleet, name)

    def restart_redis(self, box: list[RedisServer]) -> None:
        port = box[0].port
        self.timeline.redis_down = self.now()
        box[0].stop()
        time.sleep(self.args.redis_down)
        box[0] = RedisServer(port=port)
        self.timeline.redis_up = self.now()

    def faults(self, fleet: Fleet, box: list[RedisServer]) -> None:
        a = self.args
        next_kill = a.kill_every
        redis_done = a.redis_restart_at is None or a.redis_restart_at < 0
        kills = 0
        while not self.stop.is_set():
            t = self.now()
            if not redis_done and t >= a.redis_restart_at:
                self.restart_redis(box)
                redis_done = True
            elif a.kill_every > 0 and next_kill <= t < a.duration:
                restart_at = a.redis_restart_at
                quiet = not redis_done and restart_at - QUIET <= t <= restart_at + a.redis_down + QUIET
                after = (
                    redis_done and self.timeline.redis_up is not None and t < self.timeline.redis_up + QUIET
                )
                if not (quiet or after):
                    kills += 1
                    self.kill_one(fleet, kills)
                next_kill += a.kill_every
            self.supervise(fleet)
            self.stop.wait(0.2)

    # ---- the traffic
    def new_outcome(self, kind: str) -> Outcome:
        with self.lock:
            self.counter += 1
            o = Outcome(self.counter, kind, f"soak-{self.run_id}-{self.counter}", self.now())
            self.outcomes.append(o)
        return o

    def settle(self, o: Outcome, call: Callable[[], None]) -> None:
        """Runs one request and records how it ended."""
        try:
            call()
            o.status = "completed"
        except Failed as exc:
            o.status, o.reason = "failed", str(exc)
        except Lost as exc:
            o.status, o.reason = "lost", str(exc)
        except (openai.APITimeoutError, anthropic.APITimeoutError, httpx.TimeoutException):
            o.status, o.reason = "lost", "no answer within the client timeout"
        except (openai.APIConnectionError, anthropic.APIConnectionError, httpx.TransportError) as exc:
            o.status, o.reason = "lost", f"connection closed without an answer ({type(exc).__name__})"
        except (openai.APIError, anthropic.APIError) as exc:
            # An error event in a stream that the SDK raised without a status.
            o.status, o.reason = "failed", f"stream error {getattr(exc, 'code', None) or type(exc).__name__}"
        o.ended = self.now()

    def client_loop(self, c: Clients, rng: random.Random) -> None:
        while not self.stop.is_set():
            kind = rng.choice(self.kinds)
            o = self.new_outcome(kind)
            prompt = f"{rng.choice(PROMPTS)} (ref {o.marker})"
            self.settle(o, functools.partial(KINDS[kind], c, self.model, prompt, o, self.args.max_tokens))
            if o.status != "completed":
                # As a client would before trying again: a fast error (503 while Redis is away) must not
                # turn the outage into thousands of requests.
                self.stop.wait(self.args.backoff)
            elif self.args.think > 0:
                # Gaps in the interactive load, in which batch lines get slots (and are preempted).
                self.stop.wait(rng.expovariate(1.0 / self.args.think))

    def batch_loop(self, c: Clients, rng: random.Random) -> None:
        """A small batch every ``--batch-every`` seconds, each followed until it ends (through the drain)."""
        followers = []
        while not self.stop.wait(self.args.batch_every):
            o = self.new_outcome("batch")
            t = threading.Thread(target=self.settle, args=(o, functools.partial(self.batch, c, rng, o)))
            t.daemon = True
            t.start()
            followers.append(t)
        for t in followers:
            t.join(max(0.0, self.drain_deadline - time.monotonic()))

    def batch(self, c: Clients, rng: random.Random, o: Outcome) -> None:
        """Completed: status ``completed`` with every line answered 200, each custom_id exactly once."""
        ids = [f"line-{k}" for k in range(self.args.batch_lines)]
        lines = [
            {
                "custom_id": cid,
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": self.model,
                    "messages": [{"role": "user", "content": f"{rng.choice(PROMPTS)} (ref {o.marker}.{k})"}],
                    "max_tokens": self.args.max_tokens,
                },
            }
            for k, cid in enumerate(ids)
        ]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        try:
            source = c.oa.files.create(file=("soak.jsonl", data, "application/jsonl"), purpose="batch")
            batch = c.oa.batches.create(
                input_file_id=source.id, endpoint="/v1/chat/completions", completion_window="24h"
            )
        except openai.APIStatusError as exc:
            raise openai_error(exc) from None
        o.worker = batch.id
        self.check_results(c, self.wait_batch(c, batch), o, ids)

    def wait_batch(self, c: Clients, batch: Batch) -> Batch:
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            if self.stop.is_set() and time.monotonic() > self.drain_deadline:
                raise Lost(f"batch {batch.id} still {batch.status} at the end of the drain")
            time.sleep(1.0)
            try:
                batch = c.oa.batches.retrieve(batch.id)
            except openai.APIStatusError as exc:
                if exc.status_code == 404:
                    raise Failed("batch 404 (its record went with Redis)") from None
                continue  # a 503 while Redis is away: ask again
            except openai.APIConnectionError:
                continue
        return batch

    def check_results(self, c: Clients, batch: Batch, o: Outcome, ids: list[str]) -> None:
        if batch.status != "completed":
            raise Failed(f"batch {batch.status}")
        seen: Counter[str] = Counter()
        failed: Counter[str] = Counter()
        for file_id, ok in ((batch.output_file_id, True), (batch.error_file_id, False)):
            if not file_id:
                continue
            for line in c.oa.files.content(file_id).text.splitlines():
                result = json.loads(line)
                seen[result["custom_id"]] += 1
                if not ok:
                    response = result.get("response") or {}
                    code = (result.get("error") or {}).get("code") or response.get("status_code")
                    failed[str(code)] += 1
        if any(n > 1 for n in seen.values()):
            self.client_dups[o.marker].append(f"batch {batch.id}: result lines {dict(seen)}")
        if set(seen) != set(ids):
            raise Lost(f"batch {batch.id}: lines without a result: {sorted(set(ids) - set(seen))}")
        if failed:
            raise Failed(f"batch lines failed: {', '.join(sorted(failed))}")

    def clients(self, base: str) -> Clients:
        timeout = self.args.request_timeout + 30.0
        return Clients(
            base,
            timeout,
            openai.OpenAI(base_url=f"{base}/v1", api_key="soak", max_retries=0, timeout=timeout),
            anthropic.Anthropic(base_url=base, api_key="soak", max_retries=0, timeout=timeout),
            httpx.Client(base_url=base, timeout=timeout),
        )

    # ---- the run
    def run(self) -> int:
        a = self.args
        box = [RedisServer()]
        env = {
            "INFERQ_REQUEST_TIMEOUT": str(a.request_timeout),
            # The defaults of a real deployment (tests/fleet.py's are 0.5 s and 2 s, for quick tests).
            "INFERQ_HEARTBEAT_INTERVAL": str(a.heartbeat_ttl / 4),
            "INFERQ_HEARTBEAT_TTL": str(a.heartbeat_ttl),
        }
        if a.engine == "scripted":
            catalog = self.tmp / "models.yaml"
            catalog.write_text(SCRIPTED_CATALOG % catalog)
            env["INFERQ_MODELS_FILE"] = str(catalog)
        fleet = Fleet(box[0].url, self.tmp, **env)
        monitor = Monitor(box[0].url, self.now)
        threads: list[threading.Thread] = []
        try:
            fleet.start_api()
            names = [f"w{i + 1}" for i in range(a.workers)]
            for name in names:
                self.start_worker(fleet, name)
            for name in names:
                fleet.wait_listed(name, timeout=120)
            monitor.start()
            time.sleep(0.5)  # the monitor's subscription is in place before the first job
            self.t0 = time.monotonic()
            for i in range(a.concurrency):
                c = self.clients(fleet.base_url)
                t = threading.Thread(target=self.client_loop, args=(c, random.Random(a.seed * 1000 + i)))
                t.daemon = True  # a hung request must not keep the script from reporting it
                t.start()
                threads.append(t)
            if a.batch_every > 0:
                c = self.clients(fleet.base_url)
                t = threading.Thread(target=self.batch_loop, args=(c, random.Random(a.seed - 1)), daemon=True)
                t.start()
                threads.append(t)
            faults = threading.Thread(target=self.faults, args=(fleet, box), daemon=True)
            faults.start()
            self.stop.wait(a.duration)
            self.drain_deadline = time.monotonic() + a.request_timeout + 60.0
            self.stop.set()
            faults.join()
            for t in threads:
                t.join(max(0.0, self.drain_deadline + 5.0 - time.monotonic()))
            stopped = self.now()
            for o in self.outcomes:
                if o.status == "open":
                    o.status, o.reason = "lost", "still open after the drain"
            time.sleep(1.0)  # the last events reach the monitor
            stranded = self.stranded(box[0])
            monitor.done.set()
            monitor.join(5)
            sys.stdout.write(self.report(monitor, stranded, stopped, fleet) + "\n")
            lost = sum(o.status == "lost" for o in self.outcomes)
            return 1 if lost or self.duplicated(monitor) or self.text_mismatches(monitor) else 0
        finally:
            self.stop.set()
            monitor.done.set()
            fleet.close()
            box[0].stop()

    def stranded(self, server: RedisServer) -> list[str]:
        """Job records still queued or running after the traffic drained; and, in ``self.records``, every
        job record left (ended ones are kept ``INFERQ_JOB_RETENTION``) by the marker of its request."""
        client = redis.Redis.from_url(server.url, decode_responses=True)
        try:
            found = []
            for key in client.scan_iter(f"{keys.JOB_PREFIX}*"):
                raw = {str(k): str(v) for k, v in client.hgetall(key).items()}
                job_id = key[len(keys.JOB_PREFIX) :]
                state = raw.get("state", "?")
                if state in ("queued", "running"):
                    found.append(f"{job_id} ({state})")
                marker = MARKER.search(raw.get("payload", ""))
                fields = ("state", "attempt", "worker", "routed_to")
                summary = " ".join(f"{f}={raw[f]}" for f in fields if f in raw)
                self.records[request_of(marker.group(0)) if marker else "?"].append(f"{job_id} {summary}")
            return found
        finally:
            client.close()

    def duplicated(self, monitor: Monitor) -> dict[str, list[str]]:
        """Markers of duplicated requests (a batch's line k counts for its batch), each with the job ids
        (and why) behind it."""
        dups: dict[str, list[str]] = defaultdict(list, {m: list(w) for m, w in self.client_dups.items()})
        finished_jobs: dict[str, list[str]] = defaultdict(list)
        with monitor.lock:
            for job_id, seen in monitor.jobs.items():
                request = request_of(seen.marker)
                if len(seen.finished) > 1:
                    dups[request].append(f"{job_id} ({seen.marker}): finished {len(seen.finished)}x")
                if seen.restarted_after_finish:
                    dups[request].append(f"{job_id} ({seen.marker}): started again after it finished")
                if seen.finished and seen.marker and seen.marker != "?":
                    finished_jobs[seen.marker].append(job_id)
        for marker, jobs in finished_jobs.items():
            if len(jobs) > 1:
                dups[request_of(marker)].append(f"{marker}: {len(jobs)} jobs finished: {', '.join(jobs)}")
        return dict(dups)

    def text_mismatches(self, monitor: Monitor) -> list[str]:
        """Completed streams whose text is not exactly what the worker generated (its last attempt's deltas):
        text sent twice, or a piece missing. Streams in flight across the Redis restart are left out: the
        monitor itself misses the events published while it reconnects."""
        mismatches = []
        with monitor.lock:
            by_marker = {seen.marker: seen for seen in monitor.jobs.values() if seen.finished}
            for o in self.outcomes:
                seen = by_marker.get(o.marker)
                if o.text is None or o.status != "completed" or seen is None or o.ended is None:
                    continue
                if self.timeline.during(o.sent, o.ended) == "redis":
                    continue
                generated = seen.text.get(seen.finished[-1][0], "")
                if o.text != generated:
                    at = common_prefix(o.text, generated)
                    mismatches.append(
                        f"  TEXT {o.marker} {o.kind}: client got {len(o.text)} chars, the worker generated "
                        f"{len(generated)}; from char {at} the client got {o.text[at : at + 40]!r}, "
                        f"the worker {generated[at : at + 40]!r}"
                    )
        return mismatches

    def report(self, monitor: Monitor, stranded: list[str], stopped: float, fleet: Fleet) -> str:
        a = self.args
        dups = self.duplicated(monitor)
        texts = self.text_mismatches(monitor)
        by_marker = {o.marker: o for o in self.outcomes}
        tl = self.timeline
        out = [
            f"soak: {a.duration:g} s of traffic (drained at {stopped:.0f} s), engine {a.engine} "
            f"({self.model}, max_tokens {a.max_tokens}), {a.workers} workers, concurrency {a.concurrency}, "
            f"seed {a.seed}",
            f"faults: {len(tl.kills)} worker kills (SIGKILL) at "
            f"{', '.join(f'{t:.0f}' for t, _ in tl.kills) or '-'} s; "
            + (
                f"Redis restarted empty at {tl.redis_down:.0f} s (back at {tl.redis_up:.0f} s)"
                if tl.redis_down is not None and tl.redis_up is not None
                else "no Redis restart"
            )
            + f"; workers that exited on their own: {len(tl.unexpected_exits)}",
            "",
            "| kind | sent | completed | failed | lost | duplicated | p50 s | p95 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def row(label: str, group: list[Outcome]) -> str:
            done = [o.ended - o.sent for o in group if o.status == "completed" and o.ended is not None]
            p50 = statistics.median(done) if done else float("nan")
            p95 = statistics.quantiles(done, n=20, method="inclusive")[18] if len(done) > 1 else p50
            counts = Counter(o.status for o in group)
            dup = sum(o.marker in dups for o in group)
            return (
                f"| {label} | {len(group)} | {counts['completed']} | {counts['failed']} | {counts['lost']} "
                f"| {dup} | {p50:.2f} | {p95:.2f} |"
            )

        for kind in [*self.kinds, *(["batch"] if a.batch_every > 0 else [])]:
            out.append(row(kind, [o for o in self.outcomes if o.kind == kind]))
        out.append(row("**total**", self.outcomes))
        reasons: dict[str, Counter[str]] = defaultdict(Counter)
        for o in self.outcomes:
            if o.status == "failed" and o.ended is not None:
                reasons[o.reason][tl.during(o.sent, o.ended)] += 1
        out += ["", "| failed: reason | count | in flight across the Redis restart | across a kill | other |"]
        out.append("|---|---:|---:|---:|---:|")
        for reason, where in sorted(reasons.items(), key=lambda kv: -sum(kv[1].values())):
            out.append(
                f"| {reason} | {sum(where.values())} | {where['redis']} | {where['kill']} "
                f"| {where['other']} |"
            )
        if not reasons:
            out.append("| (none) | 0 | | | |")
        with monitor.lock:
            jobs = len(monitor.jobs)
            finishes = sum(len(s.finished) for s in monitor.jobs.values())
            reruns = sum(len({s[0] for s in seen.started}) > 1 for seen in monitor.jobs.values())
        logs = "".join(fleet.log(p.stem) for p in self.tmp.glob("w*.log"))
        out += [
            "",
            f"worker side: {jobs} jobs seen on pub/sub, {finishes} finished events, {reruns} jobs run again "
            f"as a later attempt, {len(dups)} duplicated requests "
            f"(monitor reconnected {monitor.reconnects}x); "
            f"worker logs: {logs.count('re-queued job')} jobs re-queued, "
            f"{logs.count('skipping stale delivery')} stale deliveries skipped, "
            f"{logs.count('Traceback')} tracebacks",
            f"completed streams whose text differs from what the worker generated: {len(texts)}",
            f"job records still queued/running after the drain: {len(stranded)}"
            + (f" ({', '.join(stranded[:10])})" if stranded else ""),
            f"logs and every request and job (soak.json): {self.tmp}",
        ]
        jobs_of: dict[str, list[str]] = defaultdict(list)
        with monitor.lock:
            for job_id, seen in monitor.jobs.items():
                jobs_of[request_of(seen.marker)].append(
                    f"{job_id} started {seen.started} finished {seen.finished} errors {seen.errors}"
                )

        def detail(label: str, o: Outcome) -> str:
            ended = o.ended if o.ended is not None else stopped
            return (
                f"  {label} {o.marker} {o.kind}: sent {o.sent:.1f} s, ended {ended:.1f} s "
                f"({tl.during(o.sent, ended)}): {o.reason}; worker {o.worker or '?'}; "
                f"jobs: {jobs_of.get(o.marker) or 'none seen'}; "
                f"records: {self.records.get(o.marker) or 'none'}"
            )

        lost = [o for o in self.outcomes if o.status == "lost"]
        # An answer only at the request's deadline: not lost (the client was told), but it hung that long.
        hung = [o for o in self.outcomes if o.status == "failed" and "timeout" in o.reason]
        if lost or dups or hung or texts:
            out += [
                "",
                "lost, duplicated, a stream's text not the worker's, or answered only at the deadline:",
            ]
        out += [detail("LOST", o) for o in lost]
        for marker, why in dups.items():
            o2 = by_marker.get(marker)
            what = f"{o2.kind} sent {o2.sent:.1f} s" if o2 else "request unknown"
            out.append(f"  DUPLICATED {marker} ({what}): {'; '.join(why)}")
        out += texts
        out += [detail("TIMED OUT", o) for o in hung]
        (self.tmp / "soak.json").write_text(
            json.dumps(
                {
                    "timeline": asdict(tl),
                    "outcomes": [asdict(o) for o in self.outcomes],
                    "jobs": {j: asdict(seen) for j, seen in monitor.jobs.items()},
                    "records": self.records,
                },
                indent=1,
            )
        )
        return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    p.add_argument("--workers", type=int, default=3, help="worker processes (default 3)")
    p.add_argument("--kill-every", type=float, default=40.0, help="seconds between worker kills (0: none)")
    p.add_argument(
        "--redis-restart-at", type=float, default=None, help="seconds in (default: mid-run; <0: none)"
    )
    p.add_argument("--redis-down", type=float, default=5.0, help="seconds Redis stays away (default 5)")
    p.add_argument("--engine", choices=("llamacpp", "scripted"), default="llamacpp")
    p.add_argument("--concurrency", type=int, default=6, help="client threads (default 6)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per generation (default 16)")
    p.add_argument("--request-timeout", type=float, default=60.0, help="INFERQ_REQUEST_TIMEOUT (default 60)")
    p.add_argument("--think", type=float, default=1.0, help="mean pause between requests (default 1 s)")
    p.add_argument(
        "--backoff", type=float, default=0.5, help="a client's pause after a failure (default 0.5)"
    )
    p.add_argument("--batch-every", type=float, default=60.0, help="seconds between batches (0: none)")
    p.add_argument("--batch-lines", type=int, default=4, help="chat lines per batch (default 4)")
    p.add_argument(
        "--heartbeat-ttl",
        type=float,
        default=4.0,
        help="INFERQ_HEARTBEAT_TTL (default 4 s)",
    )
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.redis_restart_at is None:
        args.redis_restart_at = args.duration / 2
    if args.workers < 2 or args.concurrency < 1 or args.duration <= 0:
        p.error("--workers must be >= 2 (a kill leaves one serving), --concurrency >= 1, --duration > 0")
    # SIGTERM unwinds like Ctrl-C, so the processes and the Redis this script started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(Soak(args).run())


if __name__ == "__main__":
    main()
