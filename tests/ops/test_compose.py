"""docker-compose.yml as Compose reads it, without a Docker daemon: valid with and without the cuda profile
(`docker compose config`, else Debian's docker-compose, which `make test` installs), its services and
profiles, the GPU worker's build and reservation, Grafana's mounts, and every `inferq` command in it (and the
Dockerfile's) one the CLI accepts."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from ops.cli import main

ROOT = Path(__file__).resolve().parent.parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
ALWAYS = {"redis", "api", "worker", "flower", "prometheus", "grafana"}


def validator() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return None if legacy is None else [legacy]


@pytest.fixture(scope="module")
def compose() -> list[str]:
    found = validator()
    if found is None:
        pytest.skip(
            "no Compose validator: neither the docker compose plugin nor docker-compose is installed "
            "(`make compose-validator` installs Debian's docker-compose as root)"
        )
    return found


def run(compose: list[str], *args: str) -> str:
    # COMPOSE_* variables (COMPOSE_PROFILES, COMPOSE_FILE) of the caller would change what is read.
    env = {k: v for k, v in os.environ.items() if not k.startswith("COMPOSE_")}
    done = subprocess.run(
        [*compose, "-f", str(COMPOSE_FILE), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def raw() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.mark.parametrize("profile", [[], ["--profile", "cuda"]], ids=["default", "cuda"])
def test_compose_validates_it(compose: list[str], profile: list[str]) -> None:
    run(compose, *profile, "config", "-q")


def test_workers_by_profile(compose: list[str]) -> None:
    services: dict[str, Any] = yaml.safe_load(run(compose, "--profile", "cuda", "config"))["services"]
    assert set(services) == ALWAYS | {"worker-cuda"}
    assert {name for name, s in services.items() if s.get("profiles")} == {"worker-cuda"}
    assert services["worker-cuda"]["profiles"] == ["cuda"]


def test_the_cuda_worker_builds_vllm_and_reserves_the_gpus() -> None:
    cuda = raw()["services"]["worker-cuda"]
    assert "vllm-cuda" in cuda["build"]["args"]["EXTRAS"].split(",")
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "ARG EXTRAS=llamacpp" in dockerfile and '".[${EXTRAS}]"' in dockerfile  # the arg is used
    [device] = cuda["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert "--engine vllm" in " ".join(cuda["command"])
    assert "--engine llamacpp" in " ".join(raw()["services"]["worker"]["command"])


def test_grafana_mounts_provisioning_and_dashboards() -> None:
    grafana = raw()["services"]["grafana"]
    assert grafana["image"].startswith("grafana/grafana")
    assert grafana["volumes"] == [
        "./ops/grafana/provisioning:/etc/grafana/provisioning:ro",
        "./ops/grafana/dashboards:/var/lib/grafana/dashboards:ro",
    ]
    assert grafana["ports"] == ["127.0.0.1:3000:3000"]


def inferq_commands() -> list[list[str]]:
    """Every `inferq ...` in the compose file's commands (also inside `sh -c` scripts) and the Dockerfile's
    CMD, as argument lists after `inferq`."""
    commands: list[list[str]] = []
    cmd = re.search(r"^CMD (\[.*\])$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)
    assert cmd is not None
    lines: list[list[str]] = [json.loads(cmd.group(1))]
    for service in raw()["services"].values():
        command = service.get("command", [])
        lines.append(shlex.split(command) if isinstance(command, str) else command)
    for argv in lines:
        scripts = [argv[2]] if argv[:2] == ["sh", "-c"] else [shlex.join(argv)]
        for script in scripts:
            for part in re.split(r"&&|\|\||;", script):
                words = shlex.split(part)
                words = words[1:] if words[:1] == ["exec"] else words
                if words[:1] == ["inferq"]:
                    commands.append(words[1:])
    return commands


def accept(args: list[str]) -> None:
    """Parse ``args`` as the `inferq` CLI would: unknown commands, options or missing arguments raise."""
    command: click.Command = main
    path = ["inferq"]
    while isinstance(command, click.Group):
        name, *args = args
        found = command.get_command(click.Context(command), name)
        if found is None:
            raise click.UsageError(f"{' '.join(path)} has no command {name!r}")
        path.append(name)
        command = found
    command.make_context(" ".join(path), args)


def test_every_inferq_command_is_one_the_cli_takes() -> None:
    commands = inferq_commands()
    # api (Dockerfile and service), the CPU worker, the GPU worker's prepare and worker.
    assert len(commands) == 5, commands
    for args in commands:
        accept(args)


@pytest.mark.parametrize(
    "args", [["wrker"], ["worker", "--engin", "vllm"], ["models", "prepare", "--engine", "vllm"]]
)
def test_the_cli_check_refuses_what_the_cli_refuses(args: list[str]) -> None:
    with pytest.raises(click.UsageError):
        accept(args)
