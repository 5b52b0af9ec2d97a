"""Every Redis key, pub/sub channel, Celery queue and task name that inferq uses, in one place."""

from __future__ import annotations

PREFIX = "inferq"

# Celery task names: the API enqueues by name so it never imports worker code.
GENERATE_TASK = "inferq.generate"

# One shared queue per model; workers consume the queues of the models they have loaded. Every worker also
# consumes a queue of its own, which the routing strategies other than `queue` send to.
MODEL_QUEUE_PREFIX = f"{PREFIX}.model."
WORKER_QUEUE_PREFIX = f"{PREFIX}.worker."
# kombu's Redis transport keeps a queue's messages of priority p > 0 in the list "<queue>\x06\x16<p>", one
# list per step, and a worker pops every step-0 list before any step-1 list, and so on (which step a job
# takes: queueing/bands.py). All ten steps kombu allows.
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = tuple(range(10))

# Remote-control commands (Celery broadcast) that the management API sends to one worker.
CONTROL_LOAD = "inferq_load"
CONTROL_UNLOAD = "inferq_unload"
CONTROL_PIN = "inferq_pin"

# Worker registry: a heartbeat key with a TTL per worker, plus the set of names ever announced, so a worker
# that vanished without deregistering can still be found and its jobs recovered.
WORKERS_SET = f"{PREFIX}:workers"
WORKER_PREFIX = f"{PREFIX}:worker:"
# When each worker last beat, in Redis server milliseconds (one clock for the whole fleet): routing only
# picks workers seen within two heartbeat intervals.
WORKERS_SEEN = f"{PREFIX}:workers:seen"

# Routing state shared by every API process: the round-robin cursor and smooth-weighted counters per model.
ROUTE_RR_PREFIX = f"{PREFIX}:route:rr:"
ROUTE_WEIGHTED_PREFIX = f"{PREFIX}:route:weighted:"
# Affinity routing (queueing/affinity.py): per worker, the prompt-prefix block hashes its engines hold (a
# sorted set scored by the Redis time each was last served, trimmed and expiring), and per model and session
# the worker that served the session last.
SESSION_PREFIX = f"{PREFIX}:route:session:"
# Batch lines that gave their slot to a waiting interactive request of a model, lately: so that one waiting
# request makes one worker yield, not every worker that sees it.
PREEMPT_PREFIX = f"{PREFIX}:preempt:"
# Held while one worker loads a model on demand, so concurrent requests do not start several loads.
LOAD_LOCK_PREFIX = f"{PREFIX}:lock:load:"

# Job records: one hash per request, and per worker the set of jobs it is running.
JOB_PREFIX = f"{PREFIX}:job:"
STREAM_PREFIX = f"{PREFIX}:stream:"
# A streamed job's events, kept (a Redis stream; queueing/eventlog.py).
JOB_EVENTS_PREFIX = f"{PREFIX}:job-events:"
# A resumable stream: what its request asked, so that any API process renders the rest (api/resume.py).
RESUMABLE_PREFIX = f"{PREFIX}:resumable:"
# Jobs whose streaming client left, by when they are cancelled unless it came back (score: Redis ms).
CANCEL_AFTER = f"{PREFIX}:cancel-after"
REAP_LOCK_PREFIX = f"{PREFIX}:lock:reap:"
# Jobs made queued whose message may not have been sent yet (a sorted set; member "<job id>#<attempt>",
# score the Redis time it was written, in ms). The step that queues a job writes its entry, the sender
# removes it once the message is out, and a sweep by every live worker and API process re-sends the entries
# left behind by a sender that died in between: no crash between two steps strands a job.
JOBS_UNSENT = f"{PREFIX}:jobs:unsent"

# kombu's Redis transport (not ours, named here so every key inferq reads is in this file): a message a
# consumer took off a queue waits in this hash, by delivery tag, until it is acknowledged, and the index
# holds the time (the consumer's clock) it was taken. The reaper reads them for messages a worker took and
# died with before claiming their job (queueing/recovery.py).
KOMBU_UNACKED = "unacked"
KOMBU_UNACKED_INDEX = "unacked_index"
# Set (with a TTL) when a worker was reaped: while it exists every heartbeat looks for such messages.
RESCUE_DUE = f"{PREFIX}:recovery:rescue-due"

# API keys managed through the admin API (api/keystore.py): one hash, the key's SHA-256 -> its policy (the key
# itself is never stored). Per key, its rate-limit counters (api/ratelimit.py): requests and tokens in the
# current minute and tokens in the current month (each expiring with its window), and its requests in flight.
API_KEYS = f"{PREFIX}:apikeys"
# Set when the first key is created and never unset: revoking every key does not open the API again.
API_KEYS_REQUIRED = f"{PREFIX}:apikeys:required"
RATE_PREFIX = f"{PREFIX}:rate:"
# Jobs of a model that workers took off its queues, per 5-second bucket of the worker's clock (counted by the
# claim, expiring after two minutes): the queue's drain rate, from which a refused request's Retry-After is
# computed (api/admission.py).
DRAIN_PREFIX = f"{PREFIX}:drain:"
DRAIN_BUCKET_SECONDS = 5
# Places in a model's queue promised to requests refused with a Retry-After (api/admission.py).
PROMISE_PREFIX = f"{PREFIX}:promised:"
# Tokens each account used of a model in a 5-second bucket (a hash: account id -> tokens), what fair shares
# are measured from (api/fairness.py).
SHARE_PREFIX = f"{PREFIX}:share:"
SHARE_BUCKET_SECONDS = 5
# The usage ledger (api/usage.py): one hash per day (UTC), a count per key, model and kind of count.
USAGE_PREFIX = f"{PREFIX}:usage:"

# Files API: one metadata hash per file (the bytes live in the file store) and an index by creation time.
FILE_PREFIX = f"{PREFIX}:file:"
FILES_INDEX = f"{PREFIX}:files"

# Batch API: one record per batch, an index by creation time, the set of batches not yet finished (which the
# API processes drive), per batch its line results, and a lease per batch so that one API process drives it
# at a time. A line's jobs need no key of their own: their ids are derived from the batch and the line.
BATCH_PREFIX = f"{PREFIX}:batch:"
BATCHES_INDEX = f"{PREFIX}:batches"
BATCHES_ACTIVE = f"{PREFIX}:batches:active"
BATCH_LEASE_PREFIX = f"{PREFIX}:lock:batch:"
# Stored Responses API objects (JSON: owner, response, context) and the event log a background response
# writes (a Redis stream whose entry ids are the sequence numbers: replayed from any of them).
RESPONSE_PREFIX = f"{PREFIX}:response:"
# Background responses not yet ended, and the lease of the API process that drives each one.
RESPONSES_BACKGROUND = f"{PREFIX}:responses:background"
RESPONSE_LEASE_PREFIX = f"{PREFIX}:lock:response:"


def model_queue(model: str) -> str:
    return f"{MODEL_QUEUE_PREFIX}{model}"


def worker_key(name: str) -> str:
    return f"{WORKER_PREFIX}{name}"


def worker_queue(name: str) -> str:
    return f"{WORKER_QUEUE_PREFIX}{name}"


def queue_list_keys(queue: str, below: int | None = None) -> list[str]:
    """The Redis lists that hold one kombu queue's messages, one per priority step (those served before
    ``below`` only, when given)."""
    steps = [p for p in KOMBU_PRIORITY_STEPS if below is None or p < below]
    return [queue if p == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{p}" for p in steps]


def worker_jobs_key(name: str) -> str:
    """Jobs a worker claimed and is running."""
    return f"{WORKER_PREFIX}{name}:jobs"


def worker_assigned_key(name: str) -> str:
    """Jobs routed to a worker's own queue that it has not claimed yet."""
    return f"{WORKER_PREFIX}{name}:assigned"


def worker_prefixes_key(name: str) -> str:
    """Prefix block hashes a worker's engines hold, scored by when each was last served (Redis ms)."""
    return f"{WORKER_PREFIX}{name}:prefixes"


def session_key(model: str, session: str) -> str:
    return f"{SESSION_PREFIX}{model}:{session}"


def route_rr_key(model: str) -> str:
    return f"{ROUTE_RR_PREFIX}{model}"


def route_weighted_key(model: str) -> str:
    return f"{ROUTE_WEIGHTED_PREFIX}{model}"


def preempt_key(model: str) -> str:
    return f"{PREEMPT_PREFIX}{model}"


def load_lock_key(model: str) -> str:
    return f"{LOAD_LOCK_PREFIX}{model}"


def job_key(request_id: str) -> str:
    return f"{JOB_PREFIX}{request_id}"


def stream_channel(request_id: str) -> str:
    return f"{STREAM_PREFIX}{request_id}"


def job_events_key(request_id: str) -> str:
    return f"{JOB_EVENTS_PREFIX}{request_id}"


def resumable_key(response_id: str) -> str:
    return f"{RESUMABLE_PREFIX}{response_id}"


def reap_lock_key(worker: str) -> str:
    return f"{REAP_LOCK_PREFIX}{worker}"


def unsent_member(job_id: str, attempt: int) -> str:
    """A job attempt's entry in JOBS_UNSENT (the attempt follows the last '#')."""
    return f"{job_id}#{attempt}"


def file_key(file_id: str) -> str:
    return f"{FILE_PREFIX}{file_id}"


def batch_key(batch_id: str) -> str:
    return f"{BATCH_PREFIX}{batch_id}"


def batch_results_key(batch_id: str) -> str:
    """Line index -> the line's result (an output or error line), written once."""
    return f"{BATCH_PREFIX}{batch_id}:results"


def batch_lease_key(batch_id: str) -> str:
    return f"{BATCH_LEASE_PREFIX}{batch_id}"


def response_key(response_id: str) -> str:
    return f"{RESPONSE_PREFIX}{response_id}"


def response_events_key(response_id: str) -> str:
    return f"{RESPONSE_PREFIX}{response_id}:events"


def response_lease_key(response_id: str) -> str:
    return f"{RESPONSE_LEASE_PREFIX}{response_id}"


def rate_window_key(key_digest: str, what: str, window: int) -> str:
    """A key's count of ``what`` (requests, tokens, month) in the window numbered ``window``."""
    return f"{RATE_PREFIX}{key_digest}:{what}:{window}"


def rate_inflight_key(key_digest: str) -> str:
    return f"{RATE_PREFIX}{key_digest}:inflight"


def usage_day_key(date: str) -> str:
    """The usage ledger's hash of one day (YYYY-MM-DD)."""
    return f"{USAGE_PREFIX}{date}"


def drain_key(model: str, bucket: int) -> str:
    """The count of ``model``'s jobs claimed in 5-second bucket ``bucket`` (epoch seconds // 5)."""
    return f"{DRAIN_PREFIX}{model}:{bucket}"


def promise_key(model: str) -> str:
    """Places promised to refused requests of ``model`` (a zset: member -> when due, ms; api/admission.py)."""
    return f"{PROMISE_PREFIX}{model}"


def share_held_key(model: str) -> str:
    """What the requests in flight for ``model`` may use, per account (a zset; api/fairness.py)."""
    return f"{SHARE_PREFIX}{model}:held"


def share_key(model: str, bucket: int) -> str:
    """Tokens per account of ``model`` in 5-second bucket ``bucket`` (epoch seconds // 5)."""
    return f"{SHARE_PREFIX}{model}:{bucket}"
