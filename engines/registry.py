"""Engines by name. Each is imported only when chosen, so no process imports a library it does not use."""

from __future__ import annotations

import importlib
from typing import Any

from engines.base import Engine

ENGINES: dict[str, str] = {
    "llamacpp": "engines.llamacpp:LlamaCppEngine",
    "vllm": "engines.vllm:VllmEngine",
    "mlx": "engines.mlx:MlxEngine",
    "scripted": "engines.scripted:ScriptedEngine",
}


class UnknownEngine(ValueError):
    pass


def create_engine(name: str, **kwargs: Any) -> Engine:
    try:
        target = ENGINES[name]
    except KeyError:
        raise UnknownEngine(f"unknown engine {name!r}; known: {', '.join(ENGINES)}") from None
    module_name, _, attr = target.partition(":")
    engine_class = getattr(importlib.import_module(module_name), attr)
    engine: Engine = engine_class(**kwargs)
    return engine
