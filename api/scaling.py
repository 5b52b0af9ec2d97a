"""Per-model scaling signals, read from Redis at scrape time: what an autoscaler sizes a model's workers by
(ops/keda/scaledobject.yaml scales on them; api/metrics.py serves them).

- *in flight*: the model's jobs that workers claimed and run (each live worker's job set; a job's model is
  a field of its record);
- *queue depth*: its jobs waiting for a worker, on the model's shared queue (every class) and on workers'
  own queues (routed there, not claimed yet: each worker's assigned set);
- *token backlog*: what the model's requests in flight may still use, in tokens: the fair-share held tokens
  (api/fairness.py), a prompt estimate plus ``max_tokens`` per interactive, high or low request from its
  admission to its end, queued or running. Batch lines hold none (their depth counts them), nor does any
  request while fair shares are off (``fair_share_window`` 0);
- the same backlog in *seconds*: tokens / the fleet's decode rate for the model, where the rate is, over the
  live workers that have the model ready and were measured, ``concurrency / ewma_tpot`` (tokens a second with
  every slot busy), divided equally among the models the worker has ready. Prompt tokens count as if decoded
  and ``max_tokens`` is a ceiling, so it errs long: a signal to scale up early, not a promise of latency.
  Without a measured worker there is no rate, and no seconds (the tokens are still reported).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis.asyncio as aredis

from api.fairness import held_tokens
from queueing import keys
from queueing._codec import text
from queueing.registry import WorkerInfo


@dataclass
class ModelSignals:
    in_flight: int = 0
    queue_depth: int = 0
    backlog_tokens: int = 0
    # Tokens a second the model's workers decode with every slot busy; 0: none measured.
    decode_rate: float = 0.0

    @property
    def backlog_seconds(self) -> float | None:
        return None if self.decode_rate <= 0 else self.backlog_tokens / self.decode_rate


def decode_rates(workers: Iterable[WorkerInfo]) -> dict[str, float]:
    """Per model, tokens a second its ready workers decode with every slot busy (measured workers only)."""
    rates: dict[str, float] = {}
    for w in workers:
        if not w.models or not w.ewma_tpot or w.ewma_tpot <= 0:
            continue
        share = w.concurrency / w.ewma_tpot / len(w.models)
        for model in w.models:
            rates[model] = rates.get(model, 0.0) + share
    return rates


async def model_signals(
    client: aredis.Redis, models: Iterable[str], workers: list[WorkerInfo], shared_depth: Mapping[str, int]
) -> dict[str, ModelSignals]:
    """The signals of every model in ``models`` (and of any other model a worker runs or has waiting), from
    the depth of each model's shared queue the caller already read."""
    names = sorted(set(models) | set(shared_depth))
    async with client.pipeline(transaction=False) as pipe:
        pipe.time()
        for w in workers:
            pipe.smembers(keys.worker_jobs_key(w.name))
            pipe.smembers(keys.worker_assigned_key(w.name))
        for model in names:
            pipe.zrange(keys.share_held_key(model), 0, -1, withscores=True)
        found = await pipe.execute()
    seconds, micros = found[0]
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    sets = found[1 : 1 + 2 * len(workers)]
    running = [text(j) for s in sets[0::2] for j in s]
    waiting = [text(j) for s in sets[1::2] for j in s]
    held = dict(zip(names, found[1 + 2 * len(workers) :], strict=True))
    async with client.pipeline(transaction=False) as pipe:
        for job_id in running + waiting:
            pipe.hget(keys.job_key(job_id), "model")
        owners = [None if m is None else text(m) for m in await pipe.execute()]

    signals = {model: ModelSignals(queue_depth=shared_depth.get(model, 0)) for model in names}
    for i, owner in enumerate(owners):
        if owner is None:  # the record expired or was never written: nothing to attribute
            continue
        entry = signals.setdefault(owner, ModelSignals())
        if i < len(running):
            entry.in_flight += 1
        else:
            entry.queue_depth += 1
    for model, members in held.items():
        # A member past its score was given up for lost (an API process died holding it).
        signals[model].backlog_tokens = sum(held_tokens(text(m)) for m, until in members if until > now_ms)
    for model, rate in decode_rates(workers).items():
        signals.setdefault(model, ModelSignals()).decode_rate = rate
    return signals
