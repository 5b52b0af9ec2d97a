"""A Redis primary, its replica and three sentinels on loopback: the high-availability setup a test can
fail over by killing the primary (queueing/sentinel.py is what inferq does with it)."""

from __future__ import annotations

import time

import redis

from ops.redis_server import RedisServer

SERVICE = "inferq"
# How long the sentinels wait before they call the primary down, and how long a failover may take before
# another is tried: short, so that a test's failover takes seconds (production: 5 s to 30 s, 3 min).
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 4000


class SentinelGroup:
    def __init__(self, sentinels: int = 3) -> None:
        self.primary = RedisServer()
        self.replica = RedisServer(args=("--replicaof", "127.0.0.1", str(self.primary.port)))
        monitor = (
            f"sentinel monitor {SERVICE} 127.0.0.1 {self.primary.port} 2\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
            f"sentinel parallel-syncs {SERVICE} 1\n"
        )
        self.sentinels = [RedisServer(args=("--sentinel",), extra_config=monitor) for _ in range(sentinels)]
        self._until(self._ready, "the sentinels to know the replica and each other", 30)

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def master(self) -> tuple[str, int]:
        """Where the sentinels say the master is now."""
        for s in self.sentinels:
            try:
                with redis.Redis(port=s.port, socket_timeout=1, decode_responses=True) as c:
                    host, port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
                    return host, int(port)
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answered")

    def fail_over(self, timeout: float = 30.0) -> float:
        """Kill the primary (SIGKILL); returns when the sentinels name the replica as the master, the
        seconds that took."""
        killed = time.monotonic()
        self.primary.kill()
        self._until(lambda: self.master()[1] == self.replica.port, "the replica promoted", timeout)
        return time.monotonic() - killed

    def _ready(self) -> bool:
        with redis.Redis(port=self.primary.port, decode_responses=True) as c:
            if c.info("replication").get("connected_slaves", 0) < 1:
                return False
        for s in self.sentinels:
            with redis.Redis(port=s.port, decode_responses=True) as c:
                info = c.sentinel_master(SERVICE)
                if int(info["num-slaves"]) < 1 or int(info["num-other-sentinels"]) < len(self.sentinels) - 1:
                    return False
        return True

    @staticmethod
    def _until(check: object, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not check():  # type: ignore[operator]
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {what}")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in (*self.sentinels, self.replica, self.primary):
            server.stop()
