"""The `inferq` command: up, api, worker."""

from __future__ import annotations

import copy
import logging
import os
import socket
import sys
from typing import Any

import click

from ops.batch_cli import batch
from ops.keys_cli import keys, usage
from queueing.settings import Settings, get_settings

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def _logging() -> None:
    logging.basicConfig(level=get_settings().log_level.upper(), format=LOG_FORMAT)


def _uvicorn_logging(level: str) -> dict[str, Any]:
    """uvicorn's logging config plus inferq's own handler: uvicorn applies it in every API process it starts
    (``--workers``), which ``_logging()`` of the parent does not reach; without it their inferq lines, the
    access log's among them, went nowhere."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["inferq"] = {"format": LOG_FORMAT}
    config["handlers"]["inferq"] = {
        "class": "logging.StreamHandler",
        "formatter": "inferq",
        "stream": "ext://sys.stderr",
    }
    config["root"] = {"handlers": ["inferq"], "level": level}
    return config


@click.group()
def main() -> None:
    """inferq: an OpenAI-compatible API in front of queue-fed Celery workers."""


@main.command()
@click.option("--host", default=None, help="Bind address (INFERQ_HOST).")
@click.option("--port", type=int, default=None, help="API port (INFERQ_PORT).")
@click.option("--flower/--no-flower", default=True, help="Also start Flower.")
@click.option(
    "--flower-host",
    default=None,
    help="Flower's bind address (INFERQ_FLOWER_HOST); beyond loopback Flower asks for basic auth.",
)
@click.option("--flower-port", type=int, default=None, help="Flower's port (INFERQ_FLOWER_PORT).")
def up(
    host: str | None, port: int | None, flower: bool, flower_host: str | None, flower_port: int | None
) -> None:
    """Redis (unless INFERQ_REDIS_URL is set), the API, one local worker and Flower, all on loopback
    unless told otherwise."""
    from ops.stack import Flower, run_stack

    _logging()
    s = get_settings()
    where = Flower(flower_host or s.flower_host, flower_port or s.flower_port) if flower else None
    try:
        code = run_stack(s, port or s.port, host or s.host, where)
    except ValueError as exc:  # a setting that cannot work, found before anything started
        raise click.ClickException(str(exc)) from exc
    raise SystemExit(code)


@main.command()
@click.option("--host", default=None, help="Bind address (INFERQ_HOST).")
@click.option("--port", type=int, default=None, help="API port (INFERQ_PORT).")
@click.option(
    "--workers", type=int, default=None, help="API processes sharing the port (INFERQ_API_WORKERS)."
)
def api(host: str | None, port: int | None, workers: int | None) -> None:
    """The API tier alone. Several processes (``--workers``) share nothing but Redis: any of them serves a
    stream's replay, a background response or a batch that another one started."""
    if os.environ.get("PYTHONMALLOC") is None:
        # The C allocator instead of pymalloc, which must be chosen before the interpreter starts: after a
        # burst of 1,000 streams pymalloc kept 112 arenas of 1 MiB for 62 MiB of live blocks (RSS 86 -> 156
        # MiB once the garbage was collected); glibc hands the freed pages back on malloc_trim, which
        # api.memory calls after each periodic collection (RSS 89 -> 112-116 MiB). execve keeps the pid.
        os.execve(sys.executable, sys.orig_argv, {**os.environ, "PYTHONMALLOC": "malloc"})
    import uvicorn

    _logging()
    s = get_settings()
    uvicorn.run(
        "api.app:create_app",
        factory=True,
        host=host or s.host,
        port=port or s.port,
        log_level=s.log_level.lower(),
        log_config=_uvicorn_logging(s.log_level.upper()),
        access_log=False,  # inferq.access writes each line, with more in it (api/access_log.py)
        workers=workers or s.api_workers,
    )


@main.command()
@click.option("--models", default=None, help="Comma-separated catalog models (INFERQ_WORKER_MODELS).")
@click.option("--engine", default=None, help="Force an engine, e.g. llamacpp (INFERQ_WORKER_ENGINE).")
@click.option("--name", default=None, help="Registry name (INFERQ_WORKER_NAME); default host-pid.")
@click.option("--concurrency", type=int, default=None, help="Jobs at once (INFERQ_WORKER_CONCURRENCY).")
@click.option("--weight", type=float, default=None, help="Weighted-routing share (INFERQ_WORKER_WEIGHT).")
@click.option("--pin", default=None, help="Models never evicted; default: --models (INFERQ_WORKER_PIN).")
@click.option("--max-models", type=int, default=None, help="Most models loaded (INFERQ_WORKER_MAX_MODELS).")
@click.option(
    "--memory-budget", type=int, default=None, help="Bytes of weights loaded (INFERQ_WORKER_MEMORY_BUDGET)."
)
def worker(
    models: str | None,
    engine: str | None,
    name: str | None,
    concurrency: int | None,
    weight: float | None,
    pin: str | None,
    max_models: int | None,
    memory_budget: int | None,
) -> None:
    """A Celery worker that loads its models and consumes their queues."""
    # The worker's settings are read from the environment by workers.app, as with plain `celery worker`.
    overrides = {
        "MODELS": models,
        "ENGINE": engine,
        "NAME": name,
        "CONCURRENCY": concurrency,
        "WEIGHT": weight,
        "PIN": pin,
        "MAX_MODELS": max_models,
        "MEMORY_BUDGET": memory_budget,
    }
    for key, value in overrides.items():
        if value is not None:
            os.environ[f"INFERQ_WORKER_{key}"] = str(value)
    os.environ.setdefault("INFERQ_WORKER_NAME", f"{socket.gethostname()}-{os.getpid()}")
    get_settings.cache_clear()
    s = get_settings()
    _engine_venv(s)
    # Become exactly the plain `celery -A workers.app worker` a user may run: one start-up path, and the
    # exit code of a worker that could not start reaches the caller (app.worker_main drops it).
    args = [
        "-m",
        "celery",
        "-A",
        "workers.app",
        "worker",
        "-n",
        f"{s.worker_name}@%h",
        "-l",
        s.log_level.upper(),
        # Mingle and gossip sync revoked-task lists and clocks between workers, which inferq does not use;
        # mingle alone costs every worker start a second.
        "--without-mingle",
        "--without-gossip",
    ]
    os.execv(sys.executable, [sys.executable, *args])


def _engine_venv(settings: Settings) -> None:
    """Continue in the chosen engine's own venv (.venv-vllm, .venv-mlx) when it is not installed here, or stop
    with the command that installs it (ops/engine_env.py)."""
    from ops.engine_env import EngineMissing, continue_in, engine_python
    from queueing.catalog import get_catalog

    try:
        found = engine_python(settings, get_catalog(), sys.argv[1:])
    except EngineMissing as exc:
        raise click.ClickException(str(exc)) from exc
    if found is not None:
        continue_in(*found)


@main.command()
def doctor() -> None:
    """This machine's platform, the engine libraries each interpreter imports, and the engine choice."""
    from ops.doctor import diagnose, render

    click.echo(render(diagnose()))


@main.group()
def models() -> None:
    """Model folders derived for engines that cannot read the catalog's source (vLLM, MLX)."""


@models.command("prepare")
@click.argument("model")
@click.option("--engine", required=True, help="The engine to prepare for, e.g. vllm or mlx.")
@click.option("--python", default=None, help="Interpreter with torch, transformers, gguf for the conversion.")
@click.option("--force", is_flag=True, help="Convert again even if the folder is cached.")
def prepare(model: str, engine: str, python: str | None, force: bool) -> None:
    """Derive MODEL's folder for ENGINE from its GGUF, once, into INFERQ_MODELS_CACHE; print its path."""
    from ops.prepare import PrepareError
    from ops.prepare import prepare as run_prepare
    from queueing.catalog import get_catalog

    _logging()
    try:
        click.echo(run_prepare(get_catalog(), model, engine, python=python, force=force))
    except PrepareError as exc:
        raise click.ClickException(str(exc)) from exc


main.add_command(batch)
main.add_command(keys)
main.add_command(usage)

if __name__ == "__main__":
    main()
