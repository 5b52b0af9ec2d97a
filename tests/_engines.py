"""The one place where an engine that is not there becomes a skip or a failure.

``make test`` sets ``INFERQ_REQUIRE_ENGINES`` to the engines that install on this platform (the Makefile's
``ENGINES_HERE``: llama.cpp everywhere, vLLM on Linux x86_64 or with CUDA, MLX on Linux x86_64 and Apple
silicon). A required engine that does not import, or whose venv is missing, fails the tests that need it,
naming the engine and what went wrong, so a broken install cannot pass as a run of skips. An engine not
required (pytest run by hand without the variable, or ``make test INFERQ_REQUIRE_ENGINES=``) skips as before.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

from engines.platform import ENGINE_MODULES, probe
from tests.fleet import ROOT

REQUIRE = "INFERQ_REQUIRE_ENGINES"


def required() -> list[str]:
    return [e.strip() for e in os.environ.get(REQUIRE, "").split(",") if e.strip()]


def unknown_required() -> list[str]:
    """Names in INFERQ_REQUIRE_ENGINES that are no engine: a typo there would otherwise require nothing."""
    return [e for e in required() if e not in ENGINE_MODULES]


def missing(engine: str, why: str) -> NoReturn:
    """Fail when ``engine`` is required here, else skip (also from module level)."""
    if engine in required():
        pytest.fail(f"{engine} is required here ({REQUIRE}={os.environ[REQUIRE]}) but {why}", pytrace=False)
    pytest.skip(f"{engine} {why}", allow_module_level=True)


def import_engine(engine: str, module: str) -> ModuleType:
    """``module`` of ``engine`` imported in this interpreter. A broken build (llama.cpp's shared library
    missing or built for another CPU) raises other errors than ImportError, so any error counts."""
    try:
        return importlib.import_module(module)
    except Exception as exc:
        missing(engine, f"does not import (`import {module}`): {type(exc).__name__}: {exc}")


def venv_python(engine: str) -> str:
    """The interpreter of ``.venv-<engine>``, checked to import the engine's library."""
    python = ROOT / f".venv-{engine}" / "bin" / "python"
    if not python.exists():
        missing(engine, f"is not installed: no {python} (`make engines` creates it where it installs)")
    lib = probe(engine, str(python))
    if not lib.imports:
        missing(engine, f"does not import under {python}: {lib.error}")
    return str(python)
