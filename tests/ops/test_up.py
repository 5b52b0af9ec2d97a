"""`inferq up`: its own Redis, an API and a worker, all stopped by Ctrl-C (SIGINT)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from ops.redis_server import free_port
from tests.fleet import ROOT

pytestmark = pytest.mark.e2e


def _worker_pids(up_pid: int) -> set[int]:
    pids = set()
    for child in psutil.Process(up_pid).children():
        with contextlib.suppress(psutil.Error):  # a child that just died (a zombie until reaped)
            if "worker" in child.cmdline():
                pids.add(child.pid)
    return pids


def test_up_serves_the_default_model_and_stops_cleanly() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "INFERQ_REDIS_URL"}
    env["INFERQ_LLAMACPP_THREADS"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "up", "--port", str(port), "--no-flower"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        models: list[dict[str, object]] = []
        while time.monotonic() < deadline and not models:
            with contextlib.suppress(httpx.HTTPError):  # not listening yet
                models = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"]
            time.sleep(0.2)
        # The default model is served; the catalog's other model is listed as loadable on demand.
        assert {str(m["id"]): m["status"] for m in models} == {
            "smollm2-135m": "ready",
            "gemma3-270m": "unloaded",
        }
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0

        # kill -9 of the local worker: `up` starts it again and the stack keeps serving.
        (worker,) = _worker_pids(proc.pid)
        os.kill(worker, signal.SIGKILL)
        deadline = time.monotonic() + 90
        replaced = False
        while time.monotonic() < deadline and not replaced:
            replaced = bool(_worker_pids(proc.pid) - {worker})
            time.sleep(0.2)
        assert replaced, "the worker was not restarted"
        r = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={"model": "smollm2-135m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            timeout=60,
        )
        assert r.status_code == 200
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models")
