"""A worker that cannot load its models must exit, not sit on the queues."""

from __future__ import annotations

import os
import subprocess
import sys

import redis

from ops.redis_server import RedisServer
from queueing import keys
from tests.fleet import ROOT


def test_worker_whose_model_fails_to_load_exits(redis_server: RedisServer, redis_client: redis.Redis) -> None:
    env = {**os.environ, "INFERQ_REDIS_URL": redis_server.url}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ops.cli",
            "worker",
            "--models",
            "smollm2-135m",
            "--engine",
            "bogus",
            "--name",
            "bad",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert b"cannot start the worker" in proc.stderr + proc.stdout
    assert b"no source for engine 'bogus'" in proc.stderr + proc.stdout
    assert redis_client.exists(keys.worker_key("bad")) == 0
