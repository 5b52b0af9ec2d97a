"""Engines side by side through inferq: tokens/s for one request at a time and for N concurrent requests.

For each engine (``llamacpp`` in this venv; ``vllm`` and ``mlx`` under ``.venv-vllm`` / ``.venv-mlx``), a
private Redis, the API and one worker start; the worker runs ``--concurrency N`` when the catalog's
``max_concurrency`` for the engine allows it (vLLM: 8; llama.cpp and MLX run one job at a time). The same chat
prompts are then sent as non-streamed requests (greedy, ``ignore_eos``, fixed ``max_tokens``): first one after
another, then N at once. tokens/s is completion tokens over wall time. ``--offline`` adds vLLM's own offline
throughput (``vllm.LLM.chat`` on the same prompts, in ``.venv-vllm``): the ceiling the queue is measured
against.

Run from the repository root (prepares the engine folders first if needed):

    .venv/bin/python bench/engines.py [--engines llamacpp,vllm,mlx] [--max-tokens 64] [--concurrency 8]
        [--threads 2] [--offline]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engines.platform import probe  # noqa: E402
from ops.prepare import prepare  # noqa: E402
from ops.redis_server import RedisServer  # noqa: E402
from queueing.catalog import DEFAULT_CATALOG, Catalog  # noqa: E402
from tests.fleet import Fleet  # noqa: E402

MODEL = "smollm2-135m"
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a hash table is.",
    "List three tips for learning a new language.",
    "Describe a sunrise over the mountains.",
    "What are the benefits of regular exercise?",
    "Tell me about the history of tea.",
    "How does a bicycle stay upright?",
    "Give me a recipe for pancakes.",
]

OFFLINE = r"""
import json, sys, time
from vllm import LLM, SamplingParams

def main():
    folder, n_ctx, max_tokens, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    prompts = json.loads(sys.argv[5])
    llm = LLM(model=folder, max_model_len=n_ctx, enforce_eager=True, dtype="bfloat16", max_num_seqs=n)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    convs = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(convs[:1], params, use_tqdm=False)  # warm-up
    out = {}
    for label, batch in (("single", None), ("batch", convs[:n])):
        started, tokens = time.perf_counter(), 0
        for conv in ([[c] for c in convs[:3]] if batch is None else [batch]):
            tokens += sum(len(r.outputs[0].token_ids) for r in llm.chat(conv, params, use_tqdm=False))
        out[label] = tokens / (time.perf_counter() - started)
    print("RESULT " + json.dumps(out))

if __name__ == "__main__":
    main()
"""


@dataclass
class Row:
    engine: str
    single: float
    concurrent: float
    concurrency: int
    offline_single: float | None = None
    offline_batch: float | None = None


def engine_python(engine: str) -> str | None:
    """The interpreter a worker for ``engine`` runs under, or None when the engine does not import there."""
    python = sys.executable if engine == "llamacpp" else str(ROOT / f".venv-{engine}" / "bin" / "python")
    if not Path(python).exists() or not probe(engine, python).imports:
        return None
    return python


def worker_env(engine: str) -> dict[str, str]:
    # mlx[cpu] links the reference BLAS; Debian's OpenBLAS preloaded is 2-3 times faster (../shared/NOTES.md).
    if engine == "mlx" and OPENBLAS.exists():
        return {"LD_PRELOAD": str(OPENBLAS)}
    return {}


def ask(client: httpx.Client, base: str, prompt: str, max_tokens: int) -> int:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    r = client.post(f"{base}/v1/chat/completions", json=body, timeout=600)
    r.raise_for_status()
    return int(r.json()["usage"]["completion_tokens"])


def through_inferq(base: str, max_tokens: int, n: int) -> tuple[float, float]:
    with httpx.Client() as client:
        ask(client, base, PROMPTS[0], 8)  # warm-up
        started = time.perf_counter()
        tokens = sum(ask(client, base, p, max_tokens) for p in PROMPTS[:3])
        single = tokens / (time.perf_counter() - started)
    counts: list[int] = []

    def one(prompt: str) -> None:
        with httpx.Client() as c:
            counts.append(ask(c, base, prompt, max_tokens))

    threads = [threading.Thread(target=one, args=(PROMPTS[i % len(PROMPTS)],)) for i in range(n)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return single, sum(counts) / (time.perf_counter() - started)


def bench_engine(engine: str, python: str, args: argparse.Namespace, catalog: Catalog) -> Row:
    spec = catalog.get(MODEL)
    assert spec is not None
    source = spec.sources[engine]
    if source.prepared_from is not None:
        prepare(catalog, MODEL, engine, python=python)
    concurrency = min(args.concurrency, source.max_concurrency)
    server = RedisServer()
    tmp = Path(tempfile.mkdtemp(prefix=f"bench-{engine}-"))
    fleet = Fleet(server.url, tmp, INFERQ_LLAMACPP_THREADS=str(args.threads), INFERQ_REQUEST_TIMEOUT="600")
    try:
        fleet.start_api()
        worker_args = ["--engine", engine, "--concurrency", str(concurrency)]
        fleet.start_worker(
            "bench", MODEL, wait=False, args=worker_args, python=python, env=worker_env(engine)
        )
        fleet.wait_listed("bench", timeout=300)
        single, concurrent = through_inferq(fleet.base_url, args.max_tokens, args.concurrency)
    finally:
        fleet.close()
        server.stop()
    row = Row(engine, single, concurrent, concurrency)
    if engine == "vllm" and args.offline:
        row.offline_single, row.offline_batch = offline_vllm(python, source.prepared_dir(), args)
    return row


def offline_vllm(python: str, folder: Path, args: argparse.Namespace) -> tuple[float, float]:
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(OFFLINE)
    n_ctx, prompts = "2048", json.dumps(PROMPTS)
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(args.threads)}
    done = subprocess.run(
        [python, f.name, str(folder), n_ctx, str(args.max_tokens), str(args.concurrency), prompts],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        check=True,
    )
    result = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))[7:])
    return float(result["single"]), float(result["batch"])


def table(rows: list[Row], n: int) -> str:
    def num(x: float | None) -> str:
        return "-" if x is None else f"{x:.1f}"

    head = (
        f"| engine | worker concurrency | 1 request tok/s | {n} concurrent tok/s | speed-up "
        f"| vLLM offline 1 / {n} tok/s |"
    )
    lines = [head, "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        offline = f"{num(r.offline_single)} / {num(r.offline_batch)}" if r.offline_batch else "-"
        lines.append(
            f"| {r.engine} | {r.concurrency} | {r.single:.1f} | {r.concurrent:.1f} "
            f"| {r.concurrent / r.single:.2f}x | {offline} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--engines", default="llamacpp,vllm,mlx")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="compute threads per worker")
    parser.add_argument("--offline", action="store_true", help="also vLLM's offline LLM on the same prompts")
    args = parser.parse_args()
    catalog = Catalog.load(DEFAULT_CATALOG)
    rows = []
    for engine in args.engines.split(","):
        python = engine_python(engine)
        if python is None:
            sys.stderr.write(f"skipping {engine}: it does not import here (make engines)\n")
            continue
        sys.stderr.write(f"benchmarking {engine} under {python}\n")
        rows.append(bench_engine(engine, python, args, catalog))
    sys.stdout.write(table(rows, args.concurrency) + "\n")


if __name__ == "__main__":
    main()
