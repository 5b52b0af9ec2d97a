"""`inferq doctor`: detection and engine choice as tables."""

from __future__ import annotations

import subprocess
import sys

from engines.platform import detect
from ops.doctor import ROOT, diagnose, render


def test_report_for_this_interpreter() -> None:
    report = diagnose([sys.executable])
    assert {lib.engine for lib in report.libraries} == {"llamacpp", "vllm", "mlx"}
    # The API's venv carries llama.cpp only; MLX on Apple silicon, vLLM with CUDA would be picked elsewhere.
    assert "llamacpp" in report.forceable()
    machine = detect()
    if not machine.cuda and not machine.apple_silicon:
        assert report.automatic[sys.executable] == "llamacpp"
    text = render(report)
    assert f"{machine.os} / {machine.arch}" in text
    assert "automatic choice for a worker under" in text


def test_cli_names_the_automatic_choice_and_the_forceable_engines() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ops.cli", "doctor"], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "engine" in out and "imports" in out
    forceable = next(line for line in out.splitlines() if line.startswith("forceable"))
    assert "llamacpp" in forceable
    for engine, module in (("vllm", "vllm"), ("mlx", "mlx_lm")):
        python = ROOT / f".venv-{engine}" / "bin" / "python"
        imports = python.exists() and subprocess.run([python, "-c", f"import {module}"]).returncode == 0
        assert (engine in forceable) == imports, out
