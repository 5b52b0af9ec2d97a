"""`inferq up`: Redis (unless INFERQ_REDIS_URL is set), the API, one local worker and Flower, as child
processes that stop together on Ctrl-C. A worker that dies is started again, as a supervisor would.

Everything it starts listens on loopback unless told otherwise (the API on INFERQ_HOST, Flower on
INFERQ_FLOWER_HOST, its Redis always; the worker listens on nothing). Its Redis needs a password, and Flower
asks for basic auth whenever it listens beyond loopback. No secret is put on a command line (every local user
can read those in `ps`) nor in a log line, but for a generated Flower login, printed once."""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from types import FrameType

from ops.redis_server import PASSWORD_FILE, RedisServer, masked, stored_password
from queueing.settings import Settings

logger = logging.getLogger(__name__)

# A worker that dies this soon after starting, this many times in a row, will not start (bad install, bad
# model file): the stack stops instead of restarting it forever.
QUICK_DEATH_SECONDS = 15.0
QUICK_DEATHS_ALLOWED = 3


@dataclass
class Child:
    name: str
    args: list[str]
    restart: bool
    env: dict[str, str] = field(default_factory=dict)  # this child's own variables, secrets among them
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0

    def start(self, env: dict[str, str]) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.args))
        self.proc = subprocess.Popen(self.args, env={**env, **self.env})
        self.started_at = time.monotonic()

    def died(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "" (every interface) or a name, which may resolve to anything


def _http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class Flower:
    host: str
    port: int


def flower_child(settings: Settings, flower: Flower) -> tuple[Child, str]:
    """Flower's child and the line that says where it is (and, when generated here, its login)."""
    celery = os.path.join(os.path.dirname(sys.executable), "celery")
    # The broker is the fleet's (INFERQ_REDIS_URL, a sentinel one included: ops/flower_app.py); the login
    # goes through the environment (Flower reads FLOWER_*).
    own: dict[str, str] = {}
    where = f"flower: {_http(flower.host, flower.port)}"
    login = settings.flower_basic_auth or None
    if login is None and not is_loopback(flower.host):
        # Beyond loopback, never an open Flower: its pages show every worker and task and can stop workers.
        login = f"inferq:{secrets.token_urlsafe(16)}"
        where += f" (basic auth {login}: generated, set INFERQ_FLOWER_BASIC_AUTH to choose one)"
    elif login is not None:
        where += " (basic auth: INFERQ_FLOWER_BASIC_AUTH)"
    if login is not None:
        own["FLOWER_BASIC_AUTH"] = login
    args = [celery, "-A", "ops.flower_app", "flower", f"--address={flower.host}", f"--port={flower.port}"]
    return Child("flower", args, restart=False, env=own), where


def _children(settings: Settings, port: int, host: str) -> list[Child]:
    cli = [sys.executable, "-m", "ops.cli"]
    return [
        Child(
            "worker", [*cli, "worker", "--models", settings.worker_models, "--name", "local"], restart=True
        ),
        Child("api", [*cli, "api", "--host", host, "--port", str(port)], restart=False),
    ]


def _private_redis(settings: Settings) -> RedisServer:
    server = RedisServer(password=settings.redis_password or stored_password(), own_session=True)
    kept = "INFERQ_REDIS_PASSWORD" if settings.redis_password else str(PASSWORD_FILE)
    logger.info("started redis-server at %s (password: %s)", masked(server.url), kept)
    return server


def _supervise(children: list[Child], env: dict[str, str]) -> bool:
    """One pass over the children; returns False when the stack has to stop."""
    for child in children:
        code = child.died()
        if code is None:
            continue
        if not child.restart:
            logger.error("%s exited with %s; stopping the stack", child.name, code)
            return False
        quick = time.monotonic() - child.started_at < QUICK_DEATH_SECONDS
        child.quick_deaths = child.quick_deaths + 1 if quick else 0
        if child.quick_deaths >= QUICK_DEATHS_ALLOWED:
            logger.error("%s keeps exiting right after it starts (%s); stopping the stack", child.name, code)
            return False
        logger.warning("%s exited with %s; starting it again", child.name, code)
        child.start(env)
    return True


def run_stack(settings: Settings, port: int, host: str, flower: Flower | None) -> int:
    if settings.flower_basic_auth and ":" not in settings.flower_basic_auth:
        raise ValueError("INFERQ_FLOWER_BASIC_AUTH must be user:password")
    if not is_loopback(host) and not (settings.api_keys or settings.admin_key):
        logger.warning("the API listens on %s with no API keys (INFERQ_API_KEYS): open to anyone", host)
    env = dict(os.environ)
    server: RedisServer | None = None
    if "INFERQ_REDIS_URL" not in os.environ:  # a Redis of the user's own is left as it is
        server = _private_redis(settings)
        env["INFERQ_REDIS_URL"] = server.url
    try:
        children = _children(settings, port, host)
        lines = []
        if flower is not None:
            child, line = flower_child(settings, flower)
            children.append(child)
            lines.append(line)
        lines.append(f"inferq is up: {_http(host, port)}/v1 (Ctrl-C stops everything)")
        return _run(children, env, lines)
    finally:
        if server is not None:
            server.stop()


def _run(children: list[Child], env: dict[str, str], lines: list[str]) -> int:
    """Starts the children, keeps them running until a signal or a fatal exit, then stops them."""
    stopping = False

    def _stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    code = 0
    try:
        for child in children:
            child.start(env)
        for line in lines:
            logger.info("%s", line)
        while not stopping:
            if not _supervise(children, env):
                stopping, code = True, 1
            time.sleep(0.2)
    finally:
        running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
    return code
