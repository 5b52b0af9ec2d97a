"""`inferq up`: its own Redis, an API and a worker, all stopped by Ctrl-C (SIGINT); what it exposes."""

from __future__ import annotations

import base64
import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from ops.redis_server import RedisServer, free_port
from tests.fleet import ROOT

pytestmark = pytest.mark.e2e

Listener = tuple[str, int, int]  # address, port, pid


def _up(tmp: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """`inferq up` with default settings but ``env``; its home is ``tmp``, its output ``tmp/up.log``."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("INFERQ_REDIS", "INFERQ_FLOWER", "INFERQ_HOST", "FLOWER_"))
    }
    base |= {"HOME": str(tmp), "INFERQ_LLAMACPP_THREADS": "1", **env}
    with open(tmp / "up.log", "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops.cli", "up", *args],
            env=base,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@contextlib.contextmanager
def _running(tmp: Path, *args: str, **env: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = _up(tmp, *args, **env)
    try:
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends
        proc.wait(timeout=60)


def _wait_for(what: str, check: Callable[[], bool], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):  # not listening yet
            if check():
                return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s")


def _log_match(tmp: Path, pattern: str) -> re.Match[str]:
    found: list[re.Match[str]] = []

    def seen() -> bool:
        found[:] = [m for m in [re.search(pattern, (tmp / "up.log").read_text())] if m]
        return bool(found)

    _wait_for(f"the log says {pattern!r}", seen, timeout=60)
    return found[0]


def _tree(pid: int) -> set[int]:
    return {pid, *(p.pid for p in psutil.Process(pid).children(recursive=True))}


def _ss_listeners(pids: set[int]) -> set[Listener]:
    """Listening TCP sockets of ``pids`` as `ss -ltnp` shows them."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = set()
    for line in out.splitlines():
        parts = line.split(maxsplit=5)  # state, recv-q, send-q, local, peer, process
        if len(parts) < 6:
            continue
        host, _, port = parts[3].rpartition(":")
        host = host.strip("[]").split("%")[0]  # [::1]:80, 127.0.0.1%lo:80
        for pid in map(int, re.findall(r"pid=(\d+)", parts[5])):
            if pid in pids:
                found.add(("::" if host == "*" else host, int(port), pid))  # *: IPv6 any, dual-stack
    return found


def _proc_listeners(pids: set[int]) -> set[Listener]:
    """The same from /proc/net/tcp{,6} (through psutil), for machines without `ss`."""
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    found.add((conn.laddr.ip, conn.laddr.port, pid))
    return found


def _listeners(up_pid: int) -> set[Listener]:
    pids = _tree(up_pid)
    from_proc = _proc_listeners(pids)
    if shutil.which("ss") is not None:
        # Both views agree, so the fallback is checked wherever `ss` exists.
        assert _ss_listeners(pids) == from_proc
    return from_proc


def _loopback(host: str) -> bool:
    return ipaddress.ip_address(host).is_loopback


def _raw_command(port: int, command: bytes) -> bytes:
    """Redis's first reply line to ``command`` from a client that sent nothing else (no AUTH, no HELLO)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(command + b"\r\n")
        return sock.makefile("rb").readline()


def _health(port: int) -> bool:
    r = httpx.get(f"http://127.0.0.1:{port}/v1/system/health", timeout=5)
    return r.status_code == 200 and r.json()["workers"] == ["local"]


def test_up_listens_on_loopback_only_and_its_redis_needs_a_password(tmp_path: Path) -> None:
    port, flower_port = free_port(), free_port()
    with _running(tmp_path, "--port", str(port), "--flower-port", str(flower_port)) as proc:
        _wait_for("the API is healthy with its worker", lambda: _health(port))
        flower = f"http://127.0.0.1:{flower_port}/"
        _wait_for("Flower answers", lambda: httpx.get(flower, timeout=5).status_code == 200)
        redis_port = int(_log_match(tmp_path, r"redis://:[^@]*@127\.0\.0\.1:(\d+)/0").group(1))

        listeners = _listeners(proc.pid)
        # The API, Flower and Redis are all there (the worker listens on nothing) and all on loopback.
        assert {p for _, p, _ in listeners} >= {port, flower_port, redis_port}, listeners
        assert all(_loopback(host) for host, _, _ in listeners), listeners

        # Redis refuses a client without the password; the password is in a file only its owner reads.
        assert _raw_command(redis_port, b"KEYS *").startswith(b"-NOAUTH")
        secret = tmp_path / ".local/share/inferq/redis.password"
        assert secret.stat().st_mode & 0o777 == 0o600
        password = secret.read_text().strip()
        with redis.Redis(port=redis_port, password=password) as client:
            assert client.ping() and client.dbsize() > 0  # the stack's own keys: the registry at least

        # The API and worker (and the API's pub/sub hub, which sends AUTH itself) work with it: a stream.
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={
                "model": "smollm2-135m",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
                "stream": True,
            },
            timeout=60,
        ) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]" and len(lines) > 2
    log = (tmp_path / "up.log").read_text()
    assert password not in log
    assert proc.returncode == 0, log


def test_flower_beyond_loopback_asks_for_basic_auth(tmp_path: Path) -> None:
    port, flower_port = free_port(), free_port()
    env = {
        "INFERQ_FLOWER_HOST": "0.0.0.0",
        "INFERQ_FLOWER_PORT": str(flower_port),
        "INFERQ_REDIS_PASSWORD": "configured-redis-secret",
    }
    with _running(tmp_path, "--port", str(port), **env) as proc:
        login = _log_match(tmp_path, r"flower: \S+ \(basic auth (inferq:\S+): generated").group(1)
        flower = f"http://127.0.0.1:{flower_port}"
        _wait_for("Flower answers", lambda: httpx.get(flower + "/", timeout=5).status_code > 0)
        wrong = {"Authorization": "Basic " + base64.b64encode(b"inferq:guess").decode()}
        right = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
        for page in ("/", "/tasks", "/workers", "/broker", "/api/workers", "/api/tasks"):
            assert httpx.get(flower + page, timeout=10).status_code == 401, page
            assert httpx.get(flower + page, headers=wrong, timeout=10).status_code == 401, page
        assert httpx.get(flower + "/", headers=right, timeout=10).status_code == 200

        flower_pid = next(p.pid for p in psutil.Process(proc.pid).children() if "flower" in p.cmdline())
        listeners = _listeners(proc.pid)
        assert {(h, p) for h, p, pid in listeners if pid == flower_pid} == {("0.0.0.0", flower_port)}
        # Everything else stays on loopback; the configured Redis password is the one Redis asks for.
        assert all(_loopback(h) for h, _, pid in listeners if pid != flower_pid), listeners
        redis_port = int(_log_match(tmp_path, r"redis://:[^@]*@127\.0\.0\.1:(\d+)/0").group(1))
        with redis.Redis(port=redis_port, password="configured-redis-secret") as client:
            assert client.ping()
        assert not (tmp_path / ".local/share/inferq/redis.password").exists()
    log = (tmp_path / "up.log").read_text()
    assert "configured-redis-secret" not in log
    assert log.count(login) == 1  # printed once, in the line that says where Flower is


def _worker_pids(up_pid: int) -> set[int]:
    pids = set()
    for child in psutil.Process(up_pid).children():
        with contextlib.suppress(psutil.Error):  # a child that just died (a zombie until reaped)
            if "worker" in child.cmdline():
                pids.add(child.pid)
    return pids


def test_up_serves_the_default_model_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    proc = _up(tmp_path, "--port", str(port), "--no-flower")
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
        proc.wait(timeout=60)
    log = (tmp_path / "up.log").read_text()
    assert proc.returncode == 0, log
    # Redis outlived the processes that use it (Ctrl-C reaches only `up`, which stops Redis last).
    assert "connection to Redis lost" not in log and "could not deregister" not in log, log
    assert subprocess.run(["pgrep", "-s", str(proc.pid)], capture_output=True).stdout == b""
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/v1/models")
    redis_port = int(_log_match(tmp_path, r"redis://:[^@]*@127\.0\.0\.1:(\d+)/0").group(1))
    with pytest.raises(ConnectionRefusedError):  # Redis, in a session of its own, stopped too
        socket.create_connection(("127.0.0.1", redis_port), timeout=5).close()


def test_up_leaves_a_configured_redis_as_it_is(tmp_path: Path) -> None:
    port, server = free_port(), RedisServer()  # a Redis of the user's, without a password
    try:
        with _running(tmp_path, "--port", str(port), "--no-flower", INFERQ_REDIS_URL=server.url) as proc:
            _wait_for("the API is healthy with its worker", lambda: _health(port))
            assert not any("redis-server" in p.name() for p in psutil.Process(proc.pid).children())
            with redis.Redis.from_url(server.url) as client:
                assert client.config_get("requirepass") == {"requirepass": ""}
    finally:
        server.stop()
    assert not (tmp_path / ".local/share/inferq/redis.password").exists()
    assert proc.returncode == 0
