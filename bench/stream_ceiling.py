"""The serving path's own ceiling: inferq next to a bare FastAPI + sse-starlette server, in one run.

Both servers answer ``POST /v1/chat/completions`` with the same OpenAI bytes: for ``stream: true`` a role
chunk, one content chunk per token (the scripted engine's words), a finish chunk, a usage chunk and
``data: [DONE]``; otherwise one ``chat.completion`` object. The bare server (this file with ``--serve-bare``,
in a subprocess) builds every chunk with ``json.dumps`` from a generator that costs nothing, under uvicorn
with the settings of ``inferq api`` (uvloop and httptools as installed, no access log, the C allocator): the
most the web stack alone can send. inferq is the real path: a private Redis, one ``inferq api`` and one
``inferq worker`` with a slot for every stream, whose scripted engine runs at 1e9 tokens/s (its per-token
sleep is 0 s: the engine costs nothing). The same client, in this process, reads both; within each case the
bare server goes first, then inferq, so both meet the same machine.

Cases:
- C streams: C clients at once, each running ``--rounds`` streams of ``--tokens`` tokens back to back on its
  own connection (by default enough rounds for 50,000 tokens per case). Tokens are counted from each stream's
  final ``usage.completion_tokens`` (a chunk may carry several tokens); tokens/s = tokens / wall time of the
  case. An error is a failed request, a status other than 200, an error event, or a stream without its usage
  chunk or ``[DONE]``.
- non-streamed: 32 clients send requests with ``max_tokens`` 16 for ``--requests-seconds``; requests/s =
  answers / wall time until the last answer.

The client is HTTP/1.1 over bare asyncio streams (``--client raw``), because httpx was the bottleneck: one
``httpx.AsyncClient`` shared by 32 clients spent 1.5-5 ms of CPU per non-streamed request (httpcore's pool
walks every connection, checking each socket, to place each request), which held the bare server to 200-600
requests/s; the raw client spends about 0.08 ms, and the bare server answers 3,000-3,800. ``--client httpx``
measures with httpx.

How to read the tables: "ratio to bare" is inferq's rate over the bare server's in the same case. "CPU
µs/token" (µs/request in the non-streamed case) is the CPU a component spent during the case (utime + stime
of ``/proc/<pid>/stat``; the worker with its children) over the tokens (requests) served; for the bare server
"api" is the server process. "client" is this process (the client and its RSS sampler). "other" is the rest
of the machine's busy time over the same window (``/proc/stat``): other processes on the shared cores, so a
large "other" marks a noisy run (tick-sampled, it can dip a little below 0). The API RSS peak is VmRSS
sampled every 0.2 s; "tok/chunk" is tokens per content chunk (1 where every token is its own chunk). Below
each table: the Redis commands inferq issued per token (request). The verdicts are issue 13's targets:
streamed tokens/s >= 0.9 of the bare server's with one API process, non-streamed requests/s >= 0.6 of it,
and 512 streams with no error and an API RSS under 300 MiB.

Run from the repository root (the defaults take 1-2 minutes on the 2-core VM):

    .venv/bin/python bench/stream_ceiling.py [--streams 64,512] [--tokens 200] [--rounds N]
        [--requests-seconds 10] [--client raw|httpx] [--json PATH] [--only bare|inferq]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import httpx
import psutil
import redis
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sse_starlette import EventSourceResponse, ServerSentEvent

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.scripted import WORDS  # noqa: E402
from ops.redis_server import RedisServer, free_port  # noqa: E402
from queueing.settings import Settings  # noqa: E402
from tests.fleet import Fleet, rss_bytes, write_catalog  # noqa: E402

PATH = "/v1/chat/completions"
MODEL = "scripted"
REQUEST_CLIENTS = 32
REQUEST_TOKENS = 16
REQUEST_TIMEOUT = 600.0
# Tokens a streamed case streams at least, by default (--rounds).
CASE_TOKENS = 50_000
TICK = os.sysconf("SC_CLK_TCK")
MIB = 2**20

# -- the bare server ---------------------------------------------------------------------------------------


class Message(BaseModel):
    role: str
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class BareRequest(BaseModel):
    model: str
    messages: list[Message]
    max_tokens: int = 16
    stream: bool = False
    stream_options: StreamOptions | None = None


def _word(i: int) -> str:
    # The scripted engine's i-th word, so that both servers send the same bytes.
    return " " + WORDS[i % len(WORDS)]


def _usage(body: BareRequest) -> dict[str, Any]:
    # The scripted engine's count: each message's words plus four tokens of chat framing.
    prompt = sum(len(m.content.split()) + 4 for m in body.messages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": body.max_tokens,
        "total_tokens": prompt + body.max_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
    }


def _dumps(data: dict[str, Any]) -> str:
    return json.dumps(data, separators=(",", ":"))


async def _bare_chunks(body: BareRequest) -> AsyncIterator[ServerSentEvent]:
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> ServerSentEvent:
        data: dict[str, Any] = {
            "id": cid,
            "object": "chat.completion.chunk",
            "created": created,
            "model": body.model,
            "system_fingerprint": None,
            "choices": choices,
        }
        if include_usage:
            data["usage"] = usage
        # LF line endings, as inferq's frames (api/serving/sse.py).
        return ServerSentEvent(data=_dumps(data), sep="\n")

    def choice(delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    yield chunk([choice({"role": "assistant", "content": ""})])
    for i in range(1, body.max_tokens + 1):
        yield chunk([choice({"content": _word(i)})])
    yield chunk([choice({}, "length")])
    if include_usage:
        yield chunk([], _usage(body))
    yield ServerSentEvent(data="[DONE]")


def bare_app() -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PATH)
    async def chat(body: BareRequest) -> Any:
        if body.stream:
            return EventSourceResponse(_bare_chunks(body), ping=15, sep="\n")
        text = "".join(_word(i) for i in range(1, body.max_tokens + 1))
        message = {"role": "assistant", "content": text, "tool_calls": None}
        return JSONResponse(
            {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": body.model,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "length"}],
                "usage": _usage(body),
                "system_fingerprint": None,
            }
        )

    return app


def serve_bare(port: int) -> None:
    # inferq's API runs uvicorn so (ops/cli.py `api`): loop and http "auto", no access log.
    uvicorn.run(bare_app(), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- the client --------------------------------------------------------------------------------------------


class Poster(Protocol):
    async def post(self, body: bytes) -> tuple[int, bytes]: ...


class HttpxPool:
    """One ``httpx.AsyncClient`` shared by every client of a case."""

    def __init__(self, base_url: str, size: int) -> None:
        limits = httpx.Limits(max_connections=size, max_keepalive_connections=size)
        self._client = httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits)

    def connection(self) -> Poster:
        return self

    async def post(self, body: bytes) -> tuple[int, bytes]:
        r = await self._client.post(PATH, content=body, headers={"content-type": "application/json"})
        return r.status_code, r.content

    async def aclose(self) -> None:
        await self._client.aclose()


class RawConnection:
    """HTTP/1.1 over a bare asyncio stream, kept alive: a client that costs next to nothing per chunk."""

    def __init__(self, host: str, port: int) -> None:
        self._addr = (host, port)
        self._head = (
            f"POST {PATH} HTTP/1.1\r\nhost: {host}:{port}\r\ncontent-type: application/json\r\n"
            "content-length: %d\r\n\r\n"
        ).encode()
        self._io: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> tuple[int, bytes]:
        if self._io is None:
            self._io = await asyncio.open_connection(*self._addr)
        reader, writer = self._io
        try:
            writer.write(self._head % len(body) + body)
            head = (await reader.readuntil(b"\r\n\r\n")).lower()
            if b"transfer-encoding: chunked" in head:
                content = await _read_chunked(reader)
            else:
                length = re.search(rb"content-length: *(\d+)", head)
                content = await reader.readexactly(int(length.group(1)) if length else 0)
        except BaseException:
            self.close()
            raise
        if b"connection: close" in head:
            self.close()
        return int(head[9:12]), content

    def close(self) -> None:
        if self._io is not None:
            self._io[1].close()
            self._io = None


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size = int((await reader.readline()).split(b";")[0], 16)
        data = await reader.readexactly(size + 2)  # the chunk and its CRLF
        if size == 0:
            return b"".join(parts)
        parts.append(data[:-2])


class RawPool:
    def __init__(self, base_url: str, size: int) -> None:
        url = httpx.URL(base_url)
        self._host, self._port = url.host, url.port or 80
        self._conns: list[RawConnection] = []

    def connection(self) -> Poster:
        conn = RawConnection(self._host, self._port)
        self._conns.append(conn)
        return conn

    async def aclose(self) -> None:
        for conn in self._conns:
            conn.close()


class Pool(Protocol):
    def connection(self) -> Poster: ...
    async def aclose(self) -> None: ...


POOLS: dict[str, Callable[[str, int], Pool]] = {"httpx": HttpxPool, "raw": RawPool}
CLIENT_ERRORS = (httpx.HTTPError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)
_EVENT_END = re.compile(rb"\r?\n\r?\n")


@dataclass
class Tally:
    served: int = 0  # answers without error
    tokens: int = 0
    chunks: int = 0  # content chunks of the streams
    errors: Counter[str] = field(default_factory=Counter)


def read_stream(status: int, body: bytes, tally: Tally) -> None:
    """Counts one whole streamed answer into ``tally``."""
    if status != 200:
        tally.errors[f"status {status}"] += 1
        return
    # Each event's data line (inferq's also carry an ``id:`` line, for resuming).
    lines = (line for e in _EVENT_END.split(body) for line in e.splitlines())
    events = [line for line in lines if line.startswith(b"data: ")]
    if b'"error":' in body:
        tally.errors["error event"] += 1
    elif len(events) < 4 or events[-1] != b"data: [DONE]":
        tally.errors["no [DONE]"] += 1
    elif not (usage := json.loads(events[-2][6:]).get("usage")):
        tally.errors["no usage chunk"] += 1
    else:
        tally.served += 1
        tally.tokens += usage["completion_tokens"]
        tally.chunks += len(events) - 4  # less role, finish, usage, [DONE]


def read_answer(status: int, body: bytes, tally: Tally) -> None:
    if status != 200:
        tally.errors[f"status {status}"] += 1
    elif "usage" not in (answer := json.loads(body)) or not answer.get("choices"):
        tally.errors["no usage or choices"] += 1
    else:
        tally.served += 1
        tally.tokens += answer["usage"]["completion_tokens"]


def _payload(tokens: int, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body).encode()


async def _post(
    conn: Poster, payload: bytes, tally: Tally, read: Callable[[int, bytes, Tally], None]
) -> None:
    try:
        status, body = await conn.post(payload)
    except CLIENT_ERRORS as exc:
        tally.errors[type(exc).__name__] += 1
        return
    read(status, body, tally)


async def drive_streams(pool: Pool, streams: int, rounds: int, tokens: int) -> Tally:
    tally, payload = Tally(), _payload(tokens, stream=True)

    async def client(conn: Poster) -> None:
        for _ in range(rounds):
            await _post(conn, payload, tally, read_stream)

    await asyncio.gather(*(client(pool.connection()) for _ in range(streams)))
    return tally


async def drive_requests(pool: Pool, seconds: float) -> Tally:
    tally, payload = Tally(), _payload(REQUEST_TOKENS, stream=False)
    deadline = time.perf_counter() + seconds

    async def client(conn: Poster) -> None:
        while time.perf_counter() < deadline:
            await _post(conn, payload, tally, read_answer)

    await asyncio.gather(*(client(pool.connection()) for _ in range(REQUEST_CLIENTS)))
    return tally


# -- measuring ---------------------------------------------------------------------------------------------


def _proc_cpu(pid: int, reaped: bool) -> float:
    """CPU seconds of a process (utime + stime: fields 14 and 15 of /proc/<pid>/stat), with ``reaped`` those
    of the children it has waited for (cutime + cstime)."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after the name, which may hold spaces: field 3 on
    ticks = int(fields[11]) + int(fields[12])
    if reaped:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def tree_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of a process and of each of its live descendants."""
    try:
        kids = [k.pid for k in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        kids = []
    out: dict[int, float] = {}
    for p in [pid, *kids]:
        with contextlib.suppress(OSError):
            out[p] = _proc_cpu(p, reaped=p == pid)
    return out


def machine_busy() -> float:
    """Seconds the machine's cores were busy since boot: /proc/stat less idle and iowait."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    # Steal counts as busy: a process's own CPU time includes what the hypervisor took from it.
    return (sum(ticks) - ticks[3] - ticks[4]) / TICK


class PeakRss:
    """The largest VmRSS of a process, sampled every 0.2 s in a thread while the block runs."""

    def __init__(self, pid: int, every: float = 0.2) -> None:
        self.pid, self.every, self.peak = pid, every, 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            with contextlib.suppress(OSError, RuntimeError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            if self._done.wait(self.every):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join()


@dataclass(frozen=True)
class Target:
    name: str
    base_url: str
    pids: dict[str, int]  # component ("api", "worker", "redis") -> pid; "api" is the HTTP server
    redis_url: str | None = None


@dataclass
class Result:
    case: str
    target: str
    unit: str  # "token" or "request"
    rate: float  # units per second
    units: int
    served: int
    wall_s: float
    errors: dict[str, int]
    api_rss_peak_mib: float
    cpu_us: dict[str, float]  # component -> CPU µs per unit
    tokens_per_chunk: float | None
    redis_calls: dict[str, float]  # Redis command -> calls per unit, most first

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def redis_calls(url: str | None) -> Counter[str]:
    """Calls of each command Redis served since it started (INFO commandstats)."""
    if url is None:
        return Counter()
    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return Counter({name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()})


def measure(target: Target, case: str, unit: str, run: Callable[[], Coroutine[Any, Any, Tally]]) -> Result:
    calls = redis_calls(target.redis_url)
    before = {name: tree_cpu(pid) for name, pid in target.pids.items()}
    client_before, busy_before = time.process_time(), machine_busy()
    with PeakRss(target.pids["api"]) as rss:
        start = time.perf_counter()
        tally = asyncio.run(run())
        wall = time.perf_counter() - start
    spent = {
        name: sum(v - before[name].get(p, 0.0) for p, v in tree_cpu(pid).items())
        for name, pid in target.pids.items()
    }
    spent["client"] = time.process_time() - client_before
    spent["other"] = machine_busy() - busy_before - sum(spent.values())
    calls = redis_calls(target.redis_url) - calls
    units = tally.tokens if unit == "token" else tally.served
    return Result(
        case=case,
        target=target.name,
        unit=unit,
        rate=units / wall,
        units=units,
        served=tally.served,
        wall_s=wall,
        errors=dict(tally.errors),
        api_rss_peak_mib=rss.peak / MIB,
        cpu_us={name: 1e6 * s / max(units, 1) for name, s in spent.items()},
        tokens_per_chunk=tally.tokens / tally.chunks if tally.chunks else None,
        redis_calls={name: n / max(units, 1) for name, n in calls.most_common()},
    )


async def _with_pool(kind: str, base_url: str, size: int, drive: Callable[[Pool], Awaitable[Tally]]) -> Tally:
    pool = POOLS[kind](base_url, size)
    try:
        return await drive(pool)
    finally:
        await pool.aclose()


def run_cases(targets: list[Target], args: argparse.Namespace) -> list[Result]:
    """Every case on every target, the targets in turn within a case, so both meet the same machine state."""
    for target in targets:  # a first few streams and requests of each path, not measured
        warm = functools.partial(drive_streams, streams=8, rounds=1, tokens=args.tokens)
        tally = asyncio.run(_with_pool(args.client, target.base_url, 8, warm))
        asyncio.run(
            _with_pool(args.client, target.base_url, 8, functools.partial(drive_requests, seconds=0.5))
        )
        if tally.errors:
            raise RuntimeError(f"warm-up of {target.name} failed: {dict(tally.errors)}")
    results = []
    for streams in args.streams:
        # Enough rounds for the bare server's case to last a second or two, not a fraction of one.
        rounds = args.rounds or max(1, math.ceil(CASE_TOKENS / (streams * args.tokens)))
        case = f"{streams} streams x {args.tokens} tokens x {rounds} rounds"
        drive = functools.partial(drive_streams, streams=streams, rounds=rounds, tokens=args.tokens)
        for target in targets:
            time.sleep(1.0)  # the previous case's tail (a job's end, a collection) kept out of this one
            run = functools.partial(_with_pool, args.client, target.base_url, streams, drive)
            results.append(measure(target, case, "token", run))
    case = (
        f"non-streamed, {REQUEST_CLIENTS} clients x {args.requests_seconds:g} s, max_tokens {REQUEST_TOKENS}"
    )
    drive = functools.partial(drive_requests, seconds=args.requests_seconds)
    for target in targets:
        time.sleep(1.0)
        run = functools.partial(_with_pool, args.client, target.base_url, REQUEST_CLIENTS, drive)
        results.append(measure(target, case, "request", run))
    return results


# -- the two servers ---------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    proc.kill()  # a no-op once it has exited
    proc.wait()


@contextlib.contextmanager
def bare_server(tmp: Path) -> Iterator[Target]:
    port, log_path = free_port(), tmp / "bare.log"
    # The C allocator, as ops/cli.py `api` gives inferq's API process.
    env = {**os.environ, "PYTHONMALLOC": "malloc"}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-bare", str(port)]
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{base}/health").status_code == 200:
                    break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"the bare server did not start: {log_path.read_text()[-2000:]}")
        yield Target("bare server", base, {"api": proc.pid})
    finally:
        _stop(proc)


def redis_pid(port: int) -> int:
    """The redis-server listening on ``port``: a child of this process (ops/redis_server.py keeps its
    process private)."""
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error):
            conns = child.net_connections("tcp")
            if any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns):
                return child.pid
    raise RuntimeError(f"no redis-server listening on port {port} among this process's children")


@contextlib.contextmanager
def inferq_fleet(tmp: Path, slots: int) -> Iterator[Target]:
    server = RedisServer()
    defaults = Settings.model_fields
    fleet = Fleet(
        server.url,
        tmp,
        INFERQ_MODELS_FILE=str(write_catalog(tmp / "models.yaml")),
        INFERQ_LOG_LEVEL="WARNING",
        # A deployment's heartbeats and deadline rather than tests/fleet.py's short ones: on two loaded
        # cores a 2 s heartbeat TTL takes a live worker for dead and ends its streams.
        **{
            f"INFERQ_{name.upper()}": str(defaults[name].default)
            for name in ("heartbeat_interval", "heartbeat_ttl", "request_timeout")
        },
    )
    try:
        fleet.start_api()
        # 1e9 tokens/s: the engine's per-token sleep is 0 s (engines/scripted.py), it costs nothing.
        engine = ["--engine", "scripted", "--concurrency", str(slots)]
        fleet.start_worker("bench", MODEL, args=engine, env={"INFERQ_SCRIPTED_TOKENS_PER_SECOND": "1e9"})
        assert fleet.api is not None
        pids = {"api": fleet.api.pid, "worker": fleet.workers["bench"].pid, "redis": redis_pid(server.port)}
        yield Target("inferq", fleet.base_url, pids, server.url)
    finally:
        fleet.close()
        server.stop()


# -- the report --------------------------------------------------------------------------------------------

COMPONENTS = ("api", "worker", "redis", "client", "other")
SERVING_CODE = ("api", "queueing", "workers", "engines", "ops")
BARE, INFERQ = "bare server", "inferq"


def _ratio(results: list[Result], case: str) -> float | None:
    rate = {r.target: r.rate for r in results if r.case == case}
    return rate[INFERQ] / rate[BARE] if BARE in rate and INFERQ in rate and rate[BARE] else None


def table(results: list[Result], case: str) -> list[str]:
    rows = [r for r in results if r.case == case]
    unit, ratio = rows[0].unit, _ratio(results, case)
    cpu = " | ".join(f"CPU µs/{unit}: {c}" for c in COMPONENTS)
    lines = [
        f"### {case}",
        "",
        f"| server | {unit}s/s | ratio to bare | errors | API RSS peak MiB | {cpu} | tok/chunk | wall s |",
        "|---|" + "---:|" * (6 + len(COMPONENTS)),
    ]
    for r in rows:
        shown = "1.00" if r.target == BARE else "-" if ratio is None else f"{ratio:.2f}"
        per_chunk = "-" if r.tokens_per_chunk is None else f"{r.tokens_per_chunk:.2f}"
        costs = " | ".join(f"{r.cpu_us[c]:.1f}" if c in r.cpu_us else "-" for c in COMPONENTS)
        lines.append(
            f"| {r.target} | {r.rate:,.0f} | {shown} | {r.error_count} | {r.api_rss_peak_mib:.0f} | {costs} "
            f"| {per_chunk} | {r.wall_s:.1f} |"
        )
    lines += [f"errors of {r.target}: {r.errors}" for r in rows if r.errors]
    for r in rows:
        if r.redis_calls:  # the calls of this run's own polls (INFO) are a handful in all
            top = ", ".join(f"{name} {n:.2f}" for name, n in list(r.redis_calls.items())[:8])
            lines.append(f"Redis commands per {unit} ({r.target}): {top}")
    return [*lines, ""]


def verdicts(results: list[Result]) -> list[str]:
    """One line per issue-13 target that this run measured."""
    out = []
    for case in dict.fromkeys(r.case for r in results):
        ratio, unit = _ratio(results, case), next(r.unit for r in results if r.case == case)
        if ratio is not None:
            target = 0.9 if unit == "token" else 0.6
            what = "streamed tokens/s" if unit == "token" else "non-streamed requests/s"
            mark = "PASS" if ratio >= target else "FAIL"
            out.append(f"- {mark} {what} ({case}): inferq/bare {ratio:.2f}, target >= {target}")
    for r in results:
        if r.target == INFERQ and r.case.startswith("512 streams"):
            ok = r.error_count == 0 and r.api_rss_peak_mib < 300
            out.append(
                f"- {'PASS' if ok else 'FAIL'} 512 streams: {r.error_count} errors, API RSS peak "
                f"{r.api_rss_peak_mib:.0f} MiB, target 0 errors and < 300 MiB"
            )
    return out


def _commit() -> str:
    run = functools.partial(subprocess.run, cwd=ROOT, capture_output=True, text=True, check=False)
    head = run(["git", "rev-parse", "--short", "HEAD"]).stdout.strip()
    if not head:
        return "unknown (not a git checkout)"
    # What this run measured besides the commit: uncommitted changes to the serving path's code.
    changed = run(["git", "diff", "--name-only", "HEAD", "--", *SERVING_CODE]).stdout.split()
    changed += run(["git", "ls-files", "--others", "--exclude-standard", "--", *SERVING_CODE]).stdout.split()
    return head + (f" + uncommitted changes to {', '.join(changed)}" if changed else "")


def _parse() -> argparse.Namespace:
    def counts(text: str) -> list[int]:
        return [int(v) for v in text.split(",")]

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=counts, default=[64, 512], help="concurrent streams per case")
    p.add_argument("--tokens", type=int, default=200, help="tokens per stream")
    p.add_argument(
        "--rounds",
        type=int,
        default=0,
        help=f"streams each client runs back to back; default: enough for {CASE_TOKENS:,} tokens per case",
    )
    p.add_argument("--requests-seconds", type=float, default=10.0, help="length of the non-streamed case")
    p.add_argument("--client", choices=sorted(POOLS), default="raw", help="the client of both servers")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--only", choices=("bare", "inferq"), default=None, help="measure one server only")
    p.add_argument("--serve-bare", type=int, default=None, help=argparse.SUPPRESS)  # the subprocess
    return p.parse_args()


def main() -> None:
    args = _parse()
    if args.serve_bare is not None:
        serve_bare(args.serve_bare)
        return
    # SIGTERM unwinds like Ctrl-C, so whatever this script started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    tmp = Path(tempfile.mkdtemp(prefix="inferq-stream-ceiling-"))
    began, load = time.monotonic(), os.getloadavg()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    with contextlib.ExitStack() as stack:
        targets = []
        if args.only != "inferq":
            targets.append(stack.enter_context(bare_server(tmp)))
        if args.only != "bare":
            targets.append(stack.enter_context(inferq_fleet(tmp, max(*args.streams, REQUEST_CLIENTS))))
        results = run_cases(targets, args)
    meta = {
        "date": when,
        "commit": _commit(),
        "client": args.client,
        "cores": os.cpu_count(),
        "load_before": [round(v, 2) for v in load],
        "load_after": [round(v, 2) for v in os.getloadavg()],
        "seconds": round(time.monotonic() - began, 1),
        "logs": str(tmp),
    }
    lines = [", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    for case in dict.fromkeys(r.case for r in results):
        lines += table(results, case)
    out = verdicts(results)
    sys.stdout.write("\n".join([*lines, *out]) + "\n")
    if args.json is not None:
        report = {"meta": meta, "results": [asdict(r) for r in results], "verdicts": out}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
