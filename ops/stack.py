"""`inferq up`: Redis (unless INFERQ_REDIS_URL is set), the API, one local worker and Flower, as child
processes that stop together on Ctrl-C. A worker that dies is started again, as a supervisor would."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from ops.redis_server import RedisServer
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
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    quick_deaths: int = 0

    def start(self, env: dict[str, str]) -> None:
        logger.info("starting %s: %s", self.name, " ".join(self.args))
        self.proc = subprocess.Popen(self.args, env=env)
        self.started_at = time.monotonic()

    def died(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


def _children(
    settings: Settings, env: dict[str, str], port: int, host: str, flower_port: int | None
) -> list[Child]:
    cli = [sys.executable, "-m", "ops.cli"]
    children = [
        Child(
            "worker", [*cli, "worker", "--models", settings.worker_models, "--name", "local"], restart=True
        ),
        Child("api", [*cli, "api", "--host", host, "--port", str(port)], restart=False),
    ]
    if flower_port is not None:
        celery = os.path.join(os.path.dirname(sys.executable), "celery")
        broker = env["INFERQ_REDIS_URL"]
        children.append(
            Child("flower", [celery, "--broker", broker, "flower", f"--port={flower_port}"], False)
        )
    return children


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


def run_stack(settings: Settings, port: int, host: str, flower: bool, flower_port: int) -> int:
    env = dict(os.environ)
    server: RedisServer | None = None
    if "INFERQ_REDIS_URL" not in os.environ:
        server = RedisServer()
        env["INFERQ_REDIS_URL"] = server.url
        logger.info("started redis-server at %s", server.url)
    children = _children(settings, env, port, host, flower_port if flower else None)
    for child in children:
        child.start(env)

    stopping = False

    def _stop(signum: int, _: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    logger.info("inferq is up: http://%s:%d/v1 (Ctrl-C stops everything)", host, port)
    code = 0
    try:
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
        if server is not None:
            server.stop()
    return code
