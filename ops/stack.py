"""`inferq up`: Redis (unless INFERQ_REDIS_URL is set), the API, one local worker and Flower, as child
processes that stop together on Ctrl-C."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

from ops.redis_server import RedisServer
from queueing.settings import Settings

logger = logging.getLogger(__name__)


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    logger.info("starting: %s", " ".join(args))
    return subprocess.Popen(args, env=env)


def run_stack(settings: Settings, port: int, host: str, flower: bool, flower_port: int) -> int:
    env = dict(os.environ)
    server: RedisServer | None = None
    if "INFERQ_REDIS_URL" not in os.environ:
        server = RedisServer()
        env["INFERQ_REDIS_URL"] = server.url
        logger.info("started redis-server at %s", server.url)
    cli = [sys.executable, "-m", "ops.cli"]
    children = [
        _spawn([*cli, "worker", "--models", settings.worker_models, "--name", "local"], env),
        _spawn([*cli, "api", "--host", host, "--port", str(port)], env),
    ]
    if flower:
        celery_bin = os.path.join(os.path.dirname(sys.executable), "celery")
        children.append(
            _spawn([celery_bin, "--broker", env["INFERQ_REDIS_URL"], "flower", f"--port={flower_port}"], env)
        )

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
            for child in children:
                if child.poll() is not None:
                    logger.error("%s exited with %s; stopping the stack", child.args, child.returncode)
                    stopping, code = True, 1
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            try:
                child.wait(timeout=15)
            except subprocess.TimeoutExpired:
                child.kill()
        if server is not None:
            server.stop()
    return code
