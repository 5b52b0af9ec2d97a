"""The environment a worker's engine runs in.

vLLM and MLX are installed into venvs of their own (``.venv-vllm``, ``.venv-mlx``; ops/engines.mk), never into
the main one. ``inferq worker --engine vllm`` typed in the main environment therefore continues under
``.venv-vllm/bin/python`` when that exists: ``exec`` with the same arguments, so the process a supervisor
started (its pid) is the worker. Where it does not exist the worker stops at once and says which command
installs it, instead of failing on the first import deep inside the engine.

Only an engine that was chosen (``--engine`` / INFERQ_WORKER_ENGINE, else a catalog model's ``engine``) is
looked for: the automatic choice (engines/platform.py) only picks an engine that imports where it runs.
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

from engines.platform import ENGINE_MODULES, installed_here
from queueing.catalog import Catalog
from queueing.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
# Engines that live in a venv of their own.
OWN_VENV = ("vllm", "mlx")
# Set on the exec into an engine's venv: a venv where the engine still does not import is not left again.
MARKER = "INFERQ_ENGINE_VENV"


class EngineMissing(Exception):
    pass


def venv_python(engine: str, settings: Settings) -> Path:
    return (settings.engine_venvs or ROOT) / f".venv-{engine}" / "bin" / "python"


def chosen_engines(settings: Settings, catalog: Catalog) -> set[str]:
    if settings.worker_engine:
        return {settings.worker_engine}
    specs = (catalog.get(model) for model in settings.model_list())
    return {spec.engine for spec in specs if spec is not None and spec.engine}


def _install_command(engine: str, settings: Settings) -> str:
    if settings.engine_venvs is None:
        return f"make engine-{engine}"  # or `make engines`: every engine this platform takes
    return f"ops/install_{engine}.sh {shlex.quote(str(settings.engine_venvs / f'.venv-{engine}'))}"


def engine_python(settings: Settings, catalog: Catalog, argv: list[str]) -> tuple[str, str] | None:
    """The engine whose venv the worker has to continue in, and that venv's python; None when this
    interpreter will do. ``argv``: the worker's command line after ``inferq`` (for the message)."""
    missing = sorted(e for e in chosen_engines(settings, catalog) if e in OWN_VENV and not installed_here(e))
    if not missing:
        return None
    if len(missing) > 1:
        both = " and ".join(missing)
        raise EngineMissing(f"engines {both} each have their own venv: start one worker for each")
    engine = missing[0]
    python = venv_python(engine, settings)
    module = ENGINE_MODULES[engine]
    command = shlex.join(["inferq", *argv])
    install = f"  cd {shlex.quote(str(ROOT))} && {_install_command(engine, settings)}\n  {command}"
    if os.environ.get(MARKER) == engine or Path(sys.executable) == python:
        raise EngineMissing(
            f"{module} is not installed under {sys.executable}, the {engine} engine's own venv (its install "
            f"log: .venv-{engine}.log). Install it again, then start the worker:\n{install}"
        )
    if not python.exists():
        raise EngineMissing(
            f"the {engine} engine is not installed: {sys.executable} has no {module} module, and the "
            f"engine's own venv {python.parent.parent} does not exist. Install it, then start the worker "
            f"again (it then continues in that venv by itself):\n{install}"
        )
    return engine, str(python)


def continue_in(engine: str, python: str) -> None:
    """Become this very command (its interpreter's options and script included) under ``python``."""
    os.environ[MARKER] = engine
    os.execv(python, [python, *sys.orig_argv[1:]])
