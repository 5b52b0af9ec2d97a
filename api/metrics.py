"""Prometheus metrics: the API's own request counters and latencies, plus the fleet read from Redis at scrape
time (per worker: in flight, jobs, tokens, speed; per queue: depth; per model and worker: loaded state; per
model: the scaling signals of api/scaling.py).

The fleet part is computed on each scrape rather than kept in this process, so every API process reports the
same fleet and a scrape of any one of them is enough.
"""

from __future__ import annotations

import time

import redis.asyncio as aredis
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import scaling
from queueing import keys, registry
from queueing.bands import BANDS
from queueing.catalog import Catalog

# Route templates, not raw paths, so that ids in URLs do not explode the label set.
REGISTRY = CollectorRegistry()
REQUESTS = Counter(
    "inferq_http_requests", "HTTP requests by route and status.", ["route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "inferq_http_request_seconds",
    "Time to the response's headers (a stream's first event), by route.",
    ["route"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)

# Latency of the serving path as a client sees it, by model and priority class (api/jobrun.py observes them):
# the time a job waited on its queue before a worker claimed it, its time to first token from submission, and
# the gaps between its token events (each gap divided among the tokens the event carried).
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
QUEUE_WAIT = Histogram(
    "inferq_queue_wait_seconds",
    "Time a job waited on its queue until a worker claimed it, by model and priority class.",
    ["model", "priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TTFT = Histogram(
    "inferq_request_ttft_seconds",
    "Time from a job's submission to its first token, by model and priority class.",
    ["model", "priority"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
INTER_TOKEN = Histogram(
    "inferq_request_inter_token_seconds",
    "Time between a job's tokens after the first, by model.",
    ["model"],
    buckets=(0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5),
    registry=REGISTRY,
)
# Errors answered to clients, by the protocol-neutral code (api/errors.py) and HTTP status.
REQUEST_ERRORS = Counter(
    "inferq_request_errors",
    "Requests answered with an error, by error code and HTTP status.",
    ["code", "status"],
    registry=REGISTRY,
)


class MetricsMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so a stream's chunks pass straight through: it only looks at the
    response start, which carries the status."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()

        async def observed(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = getattr(scope.get("route"), "path", "unmatched")
                REQUESTS.labels(route, str(message["status"])).inc()
                LATENCY.labels(route).observe(time.perf_counter() - started)
            await send(message)

        await self.app(scope, receive, observed)


def _line(name: str, labels: dict[str, str], value: float) -> str:
    if not labels:
        return f"{name} {value}\n"
    body = ",".join(f'{k}="{v}"' for k, v in labels.items())
    return f"{name}{{{body}}} {value}\n"


_FLEET_HELP = {
    "inferq_worker_up": ("gauge", "1 for every live worker (heartbeat not expired)."),
    "inferq_worker_in_flight": ("gauge", "Jobs running on the worker."),
    "inferq_worker_concurrency": ("gauge", "Jobs the worker runs at once."),
    "inferq_worker_jobs_completed_total": ("counter", "Jobs the worker finished."),
    "inferq_worker_jobs_failed_total": ("counter", "Jobs that failed on the worker."),
    "inferq_worker_tokens_total": ("counter", "Output tokens the worker generated (rate() gives tokens/s)."),
    "inferq_worker_ttft_seconds": ("gauge", "EWMA of the worker's time to first token."),
    "inferq_worker_seconds_per_token": ("gauge", "EWMA of the worker's seconds per output token."),
    "inferq_worker_prefill_tokens_per_second": ("gauge", "EWMA of the worker's prompt evaluation speed."),
    "inferq_worker_prompt_cache_hits_total": (
        "counter",
        "Generations that took part of their prompt from the worker's prefix cache.",
    ),
    "inferq_worker_prompt_cache_misses_total": (
        "counter",
        "Generations that found none of their prompt cached.",
    ),
    "inferq_worker_prompt_tokens_total": ("counter", "Prompt tokens of the worker's generations."),
    "inferq_worker_cached_prompt_tokens_total": (
        "counter",
        "Of those, the ones taken from the prefix cache.",
    ),
    "inferq_worker_prompt_cache_entries": ("gauge", "Prompt states the worker's engines hold."),
    "inferq_worker_prompt_cache_bytes": ("gauge", "Bytes those states take."),
    "inferq_model_loaded": ("gauge", "1 per model on a worker, by state (loading, ready, unloading)."),
    "inferq_queue_depth": ("gauge", "Messages waiting in a queue, by class (high, interactive, low, batch)."),
    "inferq_batches_active": ("gauge", "Batches not finished yet (validating to finalizing, or cancelling)."),
    # Per model, what an autoscaler sizes its workers by (api/scaling.py says how each is counted).
    "inferq_model_in_flight": ("gauge", "Jobs of the model that workers are running."),
    "inferq_model_queue_depth": (
        "gauge",
        "Jobs of the model waiting for a worker: its shared queue, every class, and workers' own queues.",
    ),
    "inferq_token_backlog": (
        "gauge",
        "Tokens the model's interactive, high and low requests in flight may use (prompt + max_tokens).",
    ),
    "inferq_token_backlog_seconds": (
        "gauge",
        "That backlog at the model's measured decode rate, every slot busy (absent while none is measured).",
    ),
}


async def fleet_text(client: aredis.Redis, catalog: Catalog) -> str:
    samples: dict[str, list[str]] = {name: [] for name in _FLEET_HELP}

    def add(name: str, labels: dict[str, str], value: float | None) -> None:
        if value is not None:
            samples[name].append(_line(name, labels, value))

    workers = await registry.live_workers(client)
    for w in workers:
        lab = {"worker": w.name, "engine": w.engine}
        add("inferq_worker_up", lab, 1)
        add("inferq_worker_in_flight", lab, w.in_flight)
        add("inferq_worker_concurrency", lab, w.concurrency)
        add("inferq_worker_jobs_completed_total", lab, w.completed)
        add("inferq_worker_jobs_failed_total", lab, w.failed)
        add("inferq_worker_tokens_total", lab, w.tokens_generated)
        add("inferq_worker_ttft_seconds", lab, w.ewma_ttft)
        add("inferq_worker_seconds_per_token", lab, w.ewma_tpot)
        add("inferq_worker_prefill_tokens_per_second", lab, w.ewma_prefill_tps)
        cache = w.prompt_cache
        add("inferq_worker_prompt_cache_hits_total", lab, cache.hits)
        add("inferq_worker_prompt_cache_misses_total", lab, cache.misses)
        add("inferq_worker_prompt_tokens_total", lab, cache.prompt_tokens)
        add("inferq_worker_cached_prompt_tokens_total", lab, cache.cached_tokens)
        add("inferq_worker_prompt_cache_entries", lab, cache.entries)
        add("inferq_worker_prompt_cache_bytes", lab, cache.bytes)
        for model, status in w.model_states.items():
            add("inferq_model_loaded", {"worker": w.name, "model": model, "state": status.state}, 1)
    queues = [keys.model_queue(m) for m in catalog.models] + [keys.worker_queue(w.name) for w in workers]
    async with client.pipeline(transaction=False) as pipe:
        for q in queues:
            for key in keys.queue_list_keys(q):
                pipe.llen(key)
        lengths = await pipe.execute()
    steps = len(keys.KOMBU_PRIORITY_STEPS)
    for i, q in enumerate(queues):
        # One list per step; each class has a band of steps (queueing/bands.py).
        depths = lengths[i * steps : (i + 1) * steps]
        for priority, band in BANDS.items():
            add("inferq_queue_depth", {"queue": q, "priority": priority}, sum(depths[s] for s in band))
    shared = {m: sum(lengths[i * steps : (i + 1) * steps]) for i, m in enumerate(catalog.models)}
    signals = await scaling.model_signals(client, catalog.models, workers, shared)
    for model, signal in sorted(signals.items()):
        lab = {"model": model}
        add("inferq_model_in_flight", lab, signal.in_flight)
        add("inferq_model_queue_depth", lab, signal.queue_depth)
        add("inferq_token_backlog", lab, signal.backlog_tokens)
        add("inferq_token_backlog_seconds", lab, signal.backlog_seconds)
    add("inferq_batches_active", {}, await client.scard(keys.BATCHES_ACTIVE))
    out = []
    for name, (kind, text) in _FLEET_HELP.items():
        out.append(f"# HELP {name} {text}\n# TYPE {name} {kind}\n")
        out.extend(samples[name])
    return "".join(out)


async def exposition(client: aredis.Redis, catalog: Catalog) -> str:
    return generate_latest(REGISTRY).decode() + await fleet_text(client, catalog)
