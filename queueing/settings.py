"""Settings shared by every inferq process, read from ``INFERQ_*`` environment variables."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INFERQ_", extra="ignore")

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        description="Redis for queues, registry and streams: redis://, rediss://, unix://, or through "
        "Sentinel: redis+sentinel://[:password@]host:26379,host2:26379/<master name>[/db]"
        "[?sentinel_password=...] (queueing/sentinel.py).",
    )
    host: str = Field("127.0.0.1", description="Address the API binds to.")
    port: int = Field(8000, description="Port the API listens on.")
    api_workers: int = Field(1, ge=1, description="API processes sharing the port (uvicorn's workers).")
    models_file: Path | None = Field(None, description="YAML model catalog; the built-in one when unset.")
    log_level: str = Field("INFO", description="Logging level of every inferq process.")
    access_log: bool = Field(
        True,
        description="One line per API request on the `inferq.access` logger (uvicorn's format plus request "
        "id, model, duration and workers; api/access_log.py). uvicorn's own access log is always off.",
    )

    # API keys (api/auth.py). Unset: the API is open.
    api_keys: str | None = Field(
        None,
        description="Comma-separated API keys, or the path of a file with one key per line; when set, every "
        "route but health and metrics needs `Authorization: Bearer <key>`.",
    )
    admin_key: str | None = Field(
        None,
        description="Key for management writes (non-GET routes under /v1/system/) and for managing keys "
        "(/v1/system/keys, `inferq keys`); also a normal key.",
    )
    max_queued: int = Field(
        0,
        ge=0,
        description="Most requests waiting on a model's queue; beyond it a request is refused with 429 "
        "queue_full and a Retry-After computed from the queue's drain rate (api/admission.py). 0: unbounded.",
    )
    max_queued_per_class: int = Field(
        0,
        ge=0,
        description="Most requests of one class (high, normal, low) waiting on a model's queue; beyond it a "
        "request of that class is refused like one over max_queued. 0: unbounded.",
    )
    fair_share_window: float = Field(
        30.0,
        ge=0,
        description="Seconds of each model's token use that fair shares are measured over: a key that used "
        "more than its share of them queues behind the other keys of its class (api/fairness.py). 0: "
        "first come, first served within a class.",
    )
    rate_limit_window: float = Field(
        60.0,
        gt=0,
        description="Seconds a managed key's requests and tokens are counted over (its rpm and tpm): a "
        "minute; tests shorten it.",
    )
    models_cache: Path = Field(
        Path("~/.cache/inferq/models"),
        description="Where `inferq models prepare` puts the folders it derives (<model>/<engine>).",
    )

    # Time limits (seconds). Every wait in the request path is bounded by one of these.
    request_timeout: float = Field(600.0, description="Longest a request may wait for its job to finish.")
    no_worker_timeout: float = Field(
        10.0, description="How long a request waits for a live worker that serves its model before a 503."
    )
    heartbeat_interval: float = Field(1.0, description="Seconds between worker heartbeats.")
    heartbeat_ttl: float = Field(
        4.0, description="A worker whose last heartbeat is older than this is dead; its jobs are re-queued."
    )
    stream_coalesce_ms: float = Field(
        10.0,
        ge=0,
        description="A worker sends a stream's token at once when its last delta went out at least this long "
        "ago (the first token always); faster tokens are gathered into one delta until then (0: a delta per "
        "token).",
    )
    stream_coalesce_tokens: int = Field(
        64, ge=1, description="Most tokens gathered into one streamed delta (see stream_coalesce_ms)."
    )
    stream_log_ttl: float = Field(
        600.0,
        gt=0,
        description="Seconds a streamed job's event log is kept after its last event: how long a client may "
        "take to reconnect with Last-Event-ID and get the rest of its stream.",
    )
    stream_reconnect_grace: float = Field(
        10.0,
        ge=0,
        description="Seconds a streamed job goes on after its client left, so that the client can reconnect "
        "and resume it; then it is cancelled (0: cancelled at once, as before resuming existed).",
    )
    stream_migration_limit: int = Field(
        3,
        ge=0,
        description="Times a stream may move to another worker mid-answer (its worker died or was drained): "
        "the next worker continues the text already sent. Past it (0: never), such a stream ends with "
        "worker_lost.",
    )
    worker_drain_grace: float = Field(
        30.0,
        ge=0,
        description="Seconds a worker asked to stop (SIGTERM) lets its running jobs go on; then each moves "
        "to another worker (a stream where it stopped, anything else from its start) and the worker exits.",
    )
    visibility_timeout: int = Field(
        7200,
        description="Broker redelivery of an unacknowledged message; longer than the longest job. "
        "Fast recovery from a dead worker comes from the heartbeat, not from this.",
    )

    # Routing and models on demand.
    routing: str = Field(
        # Not affinity, though bench/affinity.py has it well ahead on conversations: under a burst of 1,000
        # requests its pick (one more Redis call between a job's record and its send) stretched some sends
        # past the unsent sweep's 3 s, a worker's heartbeat thread spent its beats re-sending them, missed its
        # TTL and was declared dead with its streams (README: Affinity routing).
        "queue",
        description="How the API picks a worker: queue, round_robin, least_connections, weighted, random, "
        "fastest_response or affinity. The catalog can override it per model, a request per "
        "`x-inferq-routing` header.",
    )
    affinity_ttl: float = Field(
        600.0,
        gt=0,
        description="Seconds a worker's record of a served prompt prefix (and of a session's last worker) "
        "counts for `affinity` routing.",
    )
    affinity_balance_abs: int = Field(
        2,
        ge=0,
        description="`affinity` routing leaves the worker holding a prompt's prefix for the least loaded "
        "worker when the fleet is imbalanced: the former has more jobs in flight than the latter by more "
        "than this, and by more than affinity_balance_ratio times.",
    )
    affinity_balance_ratio: float = Field(
        2.0, ge=1, description="See affinity_balance_abs: both bounds must be exceeded to spill."
    )
    route_explore: float = Field(
        0.05, description="Share of fastest_response picks sent to a random worker, so all stay measured."
    )
    load_timeout: float = Field(
        120.0, description="How long a request waits for a model to be loaded on demand before a 503."
    )
    keep_alive: float = Field(
        300.0, description="Seconds an idle, unpinned model stays loaded (catalog overrides); < 0: forever."
    )

    # Worker side: what `celery -A workers.app worker` serves when started without `inferq worker`.
    worker_models: str = Field("smollm2-135m", description="Comma-separated catalog models a worker loads.")
    worker_engine: str | None = Field(
        None, description="Force an engine (llamacpp); else the catalog decides."
    )
    engine_venvs: Path | None = Field(
        None,
        description="Folder with the engine venvs (.venv-vllm, .venv-mlx) in which `inferq worker --engine "
        "vllm|mlx` continues when the engine is not installed where it was started; default: the checkout's "
        "root, where `make engines` puts them.",
    )
    worker_name: str | None = Field(
        None, description="Registry name of the worker; default: Celery's nodename."
    )
    worker_concurrency: int | None = Field(
        None,
        description="Jobs a worker runs at once; default: the most its models' catalog sources ask.",
    )
    worker_weight: float = Field(1.0, gt=0, description="Share of `weighted` routing this worker gets.")
    worker_pin: str | None = Field(
        None, description="Comma-separated models never evicted; default: the models loaded at start."
    )
    worker_max_models: int = Field(0, ge=0, description="Most models loaded at once; 0: no limit.")
    worker_memory_budget: int = Field(
        0, ge=0, description="Bytes of model weights loaded at once (file sizes); 0: no limit."
    )
    worker_stall_timeout: float = Field(
        30.0,
        gt=0,
        description="A model whose running generations on a worker all went this long without an output "
        "(longer than the slowest prompt evaluation) is stalled: the worker stops taking its work and "
        "announces itself unhealthy until they move again. Model loads do not count.",
    )
    worker_redis_timeout: float = Field(
        2.0,
        gt=0,
        description="Worker side: seconds a Redis command may take (socket timeout) and a thread may wait "
        "for a free connection of the worker's pool.",
    )
    api_redis_timeout: float = Field(
        0.5,
        gt=0,
        description="API side: seconds a Redis command or connect may take before the request answers 503 "
        "redis_unavailable (health and new requests answer within about this long while Redis is down).",
    )
    api_redis_max_connections: int = Field(
        256,
        gt=0,
        description="API side: Redis connections one API process holds at most; a request that finds them "
        "all busy waits for one (api_redis_pool_timeout) instead of failing. Streams hold one only while "
        "they read a job record, so a few hundred serve thousands of concurrent streams.",
    )
    api_redis_pool_timeout: float = Field(
        10.0,
        gt=0,
        description="API side: seconds a request waits for a free connection of the API's Redis pool. Long: "
        "all connections busy is a burst of load (a thousand streams starting on two cores held all 256 "
        "for over 2 s), not an outage; while Redis is away the commands holding them fail within "
        "api_redis_timeout and give them back.",
    )
    # Files and batches (api/files.py, api/batches/).
    files_dir: Path = Field(
        Path("~/.local/share/inferq/files"),
        description="Where uploaded files and batch results are kept (metadata is in Redis).",
    )
    file_max_bytes: int = Field(200 * 1024 * 1024, gt=0, description="Largest file `POST /v1/files` accepts.")
    max_body_bytes: int = Field(
        32 * 1024 * 1024, gt=0, description="Largest JSON request body the API accepts (a 413 beyond)."
    )
    max_json_depth: int = Field(
        64,
        gt=0,
        description="Deepest nesting of arrays and objects in a JSON body, batch line or WebSocket message.",
    )
    batch_max_in_flight: int = Field(
        16, gt=0, description="Most lines of one batch queued or running at once; the rest wait in the file."
    )
    batch_preempt: bool = Field(
        True,
        description="A batch line or lower-class job running in a worker's last free slot stops and goes "
        "back to the queue when a request of a higher class waits for that worker (at most 3 times per job).",
    )
    preempt_poll: float = Field(
        0.05,
        gt=0,
        description="Seconds between a yielding job's looks for a request of a higher class (or of a key "
        "within its share) waiting for its slot: what such a request waits at most, beside the engine's next "
        "token.",
    )
    batch_no_worker_timeout: float = Field(
        600.0, description="How long a batch line waits for a worker that serves its model before it fails."
    )
    response_ttl: int = Field(
        7 * 24 * 3600, gt=0, description="Seconds a stored Responses API object (and its event log) is kept."
    )
    job_retention: float = Field(
        300.0,
        gt=0,
        description="Seconds a job record (its prompt and result included) is kept after the job ends; "
        "a stored Responses API object is kept by response_ttl instead.",
    )

    # What `inferq up` exposes (ops/stack.py). Loopback unless told otherwise.
    flower_host: str = Field("127.0.0.1", description="Address Flower binds to under `inferq up`.")
    flower_port: int = Field(5555, description="Port Flower listens on under `inferq up`.")
    flower_basic_auth: str | None = Field(
        None,
        description="`user:password` Flower asks for. Required whenever Flower binds beyond loopback "
        "(`inferq up` generates one and prints it when unset).",
    )
    redis_password: str | None = Field(
        None,
        description="Password of the private Redis `inferq up` starts; generated (and written to "
        "~/.local/share/inferq/redis.password, mode 0600) when unset. Not used with INFERQ_REDIS_URL.",
    )
    llamacpp_threads: int | None = Field(None, description="llama.cpp threads per model; default: all cores.")
    llamacpp_cache_mib: int = Field(
        256,
        ge=0,
        description="MiB of RAM per llama.cpp model for the KV state of recent prompts beyond the one its "
        "context holds, so a conversation's next turn skips its history's prefill even when other requests "
        "came between (~23 KiB a token for SmolLM2-135M); 0: off. A catalog source's `cache_mib` option "
        "wins.",
    )

    def model_list(self) -> list[str]:
        return _split(self.worker_models)

    def pinned_list(self) -> list[str]:
        return self.model_list() if self.worker_pin is None else _split(self.worker_pin)


def _split(value: str) -> list[str]:
    return [m.strip() for m in value.split(",") if m.strip()]


@lru_cache
def get_settings() -> Settings:
    return Settings()
