"""What `inferq up` hands its children: Flower's bind address and login, the private Redis's password."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import redis

from ops.redis_server import RedisServer, masked, stored_password
from ops.stack import Flower, flower_child, is_loopback
from queueing.settings import Settings

URL = "redis://:s3cret@127.0.0.1:6390/0"


def test_the_password_file_is_generated_once_and_private(tmp_path: Path) -> None:
    path = tmp_path / "share" / "inferq" / "redis.password"
    first = stored_password(path)
    assert len(first) >= 40
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    assert stored_password(path) == first  # a restart of `inferq up` uses the same one
    path.chmod(0o644)
    assert stored_password(path) == first
    assert path.stat().st_mode & 0o777 == 0o600


def test_masked_hides_only_the_password() -> None:
    assert masked("redis://:s3cret@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert masked("rediss://user:s3cret@host:6390/2") == "rediss://user:***@host:6390/2"
    assert masked("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"


def test_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "", "10.1.2.3", "example.org"]))


def _flower(host: str, **settings: str) -> tuple[list[str], dict[str, str], str]:
    child, line = flower_child(Settings(redis_url=URL, **settings), Flower(host, 5599))  # type: ignore[arg-type]
    # No secret on the command line, which every local user can read in `ps`.
    assert "s3cret" not in " ".join(child.args)
    assert f"--address={host}" in child.args and "--port=5599" in child.args
    # The fleet's own Celery app, whose broker settings follow a sentinel failover (ops/flower_app.py).
    assert child.args[1:3] == ["-A", "ops.flower_app"] and "CELERY_BROKER_URL" not in child.env
    return child.args, child.env, line


def test_flower_on_loopback_is_open_unless_a_login_is_configured() -> None:
    _, env, line = _flower("127.0.0.1")
    assert "FLOWER_BASIC_AUTH" not in env and "basic auth" not in line
    _, env, line = _flower("127.0.0.1", flower_basic_auth="ops:pa55")
    assert env["FLOWER_BASIC_AUTH"] == "ops:pa55" and "pa55" not in line


def test_flower_beyond_loopback_always_has_a_login() -> None:
    _, env, line = _flower("0.0.0.0")
    login = env["FLOWER_BASIC_AUTH"]
    user, _, password = login.partition(":")
    assert user == "inferq" and len(password) >= 20
    assert f"basic auth {login}: generated" in line  # the one place it is printed
    assert _flower("0.0.0.0")[1]["FLOWER_BASIC_AUTH"] != login
    _, env, line = _flower("::", flower_basic_auth="ops:pa55")
    assert env["FLOWER_BASIC_AUTH"] == "ops:pa55" and "pa55" not in line


@pytest.mark.parametrize("password", ['p "w\\ @/:%é', "plain"])
def test_a_private_redis_with_a_password(password: str) -> None:
    server = RedisServer(password=password)
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET x\r\n")
            assert sock.makefile("rb").readline().startswith(b"-NOAUTH")
        # The URL carries the password (quoted), and is what every child gets.
        with redis.Redis.from_url(server.url) as client:
            assert client.ping()
        assert password not in masked(server.url)
    finally:
        server.stop()
