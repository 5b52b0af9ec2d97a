"""`inferq worker --engine vllm|mlx` started where the engine is not installed: it continues in the engine's
own venv (the same command, the same process), or stops and names the command that installs it."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ops import engine_env
from queueing.catalog import Catalog
from queueing.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
ENGINES = {"vllm": "vllm", "mlx": "mlx_lm"}
# A stand-in for an engine venv's python: it shows how it was started, and from which process.
FAKE_PYTHON = """#!/bin/sh
echo "pid=$$ marker=$INFERQ_ENGINE_VENV"
printf 'arg=%s\\n' "$@"
"""


@pytest.fixture(params=sorted(ENGINES))
def engine(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    if importlib.util.find_spec(ENGINES[name]) is not None:
        pytest.skip(f"{ENGINES[name]} is installed in this interpreter: the worker has no reason to leave it")
    return name


def fake_venv(root: Path, engine: str) -> Path:
    python = root / f".venv-{engine}" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    return python


def worker(engine: str, venvs: Path, **env: str) -> tuple[subprocess.Popen[str], str, str]:
    args = [sys.executable, "-m", "ops.cli", "worker", "--engine", engine, "--models", "smollm2-135m"]
    environ = {k: v for k, v in os.environ.items() if k != engine_env.MARKER}
    environ.update(INFERQ_ENGINE_VENVS=str(venvs), **env)
    proc = subprocess.Popen(
        args, cwd=ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out, err = proc.communicate(timeout=60)
    return proc, out, err


def test_continues_in_the_engine_venv_as_the_same_process(engine: str, tmp_path: Path) -> None:
    fake_venv(tmp_path, engine)
    proc, out, err = worker(engine, tmp_path)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0] == f"pid={proc.pid} marker={engine}"
    args = ["-m", "ops.cli", "worker", "--engine", engine, "--models", "smollm2-135m"]
    assert lines[1:] == [f"arg={a}" for a in args]


def test_a_venv_without_the_engine_is_not_left_again(engine: str, tmp_path: Path) -> None:
    fake_venv(tmp_path, engine)
    proc, out, err = worker(engine, tmp_path, **{engine_env.MARKER: engine})
    assert proc.returncode == 1 and out == ""
    assert f"{ENGINES[engine]} is not installed under {sys.executable}, the {engine} engine's own venv" in err


def test_without_the_venv_it_says_how_to_install_and_start_it(engine: str, tmp_path: Path) -> None:
    proc, out, err = worker(engine, tmp_path)
    assert proc.returncode == 1 and out == ""
    venv = tmp_path / f".venv-{engine}"
    assert f"the engine's own venv {venv} does not exist" in err
    assert f"  cd {ROOT} && ops/install_{engine}.sh {venv}\n" in err
    assert err.endswith(f"\n  inferq worker --engine {engine} --models smollm2-135m\n")


def test_the_default_place_is_the_checkout_and_make_installs_it(
    engine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(engine_env, "ROOT", tmp_path)
    settings = Settings(worker_engine=engine)
    with pytest.raises(engine_env.EngineMissing, match=f"  cd {tmp_path} && make engine-{engine}\n"):
        engine_env.engine_python(settings, Catalog(models={}), ["worker", "--engine", engine])
    python = fake_venv(tmp_path, engine)
    assert engine_env.engine_python(settings, Catalog(models={}), []) == (engine, str(python))


def test_an_engine_the_catalog_forces_counts_as_chosen(engine: str, tmp_path: Path) -> None:
    source = tmp_path / "weights"
    source.mkdir()
    catalog_file = tmp_path / "models.yaml"
    catalog_file.write_text(
        f"models:\n  m:\n    context_length: 512\n    engine: {engine}\n"
        f"    sources:\n      {engine}: {{path: {source}}}\n      llamacpp: {{path: {source}}}\n"
    )
    catalog = Catalog.load(catalog_file)
    python = fake_venv(tmp_path, engine)
    forced = Settings(worker_models="m", engine_venvs=tmp_path)
    assert engine_env.engine_python(forced, catalog, []) == (engine, str(python))
    # --engine llamacpp wins over the catalog's choice, and llama.cpp is installed here.
    assert (
        engine_env.engine_python(forced.model_copy(update={"worker_engine": "llamacpp"}), catalog, []) is None
    )
