"""Platform detection and the automatic engine choice."""

from __future__ import annotations

import platform
import shutil
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engines import platform as plat
from engines.platform import CudaDevice, Platform, choose_engine, pick
from tests import _engines

LINUX = Platform("Linux", "x86_64", apple_silicon=False)
MAC = Platform("Darwin", "arm64", apple_silicon=True)
GPU = Platform("Linux", "x86_64", apple_silicon=False, cuda_devices=(CudaDevice(0, "NVIDIA H100", 81559),))
ALL = ["llamacpp", "vllm", "mlx"]


def every(engine: str) -> bool:
    return True


def nothing(engine: str) -> bool:
    return False


@pytest.mark.parametrize(
    ("machine", "imports", "candidates", "expected"),
    [
        (MAC, every, ALL, "mlx"),
        (MAC, nothing, ALL, "llamacpp"),  # MLX not installed on this Mac
        (GPU, every, ALL, "vllm"),
        (GPU, nothing, ALL, "llamacpp"),  # CUDA, but vllm does not import
        (LINUX, every, ALL, "llamacpp"),  # vLLM's CPU build only when forced
        (GPU, every, ["llamacpp", "mlx"], "llamacpp"),  # no vLLM source for the model
        (LINUX, every, ["scripted"], "scripted"),
        (LINUX, every, ["vllm", "scripted"], "scripted"),
        (LINUX, every, ["vllm"], "vllm"),  # the only source there is
    ],
)
def test_pick(machine: Platform, imports: object, candidates: list[str], expected: str) -> None:
    assert pick(candidates, machine, imports) == expected  # type: ignore[arg-type]


def test_pick_needs_a_candidate() -> None:
    with pytest.raises(ValueError, match="no engine candidates"):
        pick([], LINUX, every)


def test_forced_engine_wins_when_the_model_has_a_source_for_it() -> None:
    assert choose_engine(ALL, "vllm", machine=LINUX) == "vllm"
    assert choose_engine(ALL, "mlx", machine=GPU) == "mlx"
    with pytest.raises(ValueError, match="forced"):
        choose_engine(["llamacpp"], "vllm", machine=GPU)


def test_without_accelerator_the_choice_is_llamacpp() -> None:
    assert choose_engine(ALL, None, machine=LINUX) == "llamacpp"


def test_detect_reads_this_machine() -> None:
    found = plat.detect()
    assert found.os == platform.system()
    assert found.arch == platform.machine().lower()
    assert 0 < found.ram_free_mib <= found.ram_total_mib
    assert found.apple_silicon == (found.os == "Darwin" and found.arch in ("arm64", "aarch64"))


@pytest.fixture
def fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    exe = tmp_path / "nvidia-smi"
    exe.write_text(
        "#!/bin/sh\nprintf '0, NVIDIA H100 80GB HBM3, 81559\\n1, NVIDIA H100 80GB HBM3, 81559\\n'\n"
    )
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    yield


@pytest.mark.usefixtures("fake_nvidia_smi")
def test_cuda_devices_from_nvidia_smi() -> None:
    assert plat._nvidia_smi() == [
        CudaDevice(0, "NVIDIA H100 80GB HBM3", 81559),
        CudaDevice(1, "NVIDIA H100 80GB HBM3", 81559),
    ]


def test_cuda_devices_from_the_driver_files(tmp_path: Path) -> None:
    gpu = tmp_path / "0000:01:00.0"
    gpu.mkdir()
    (gpu / "information").write_text("Model: \t\t NVIDIA H200\nIRQ:   \t\t 150\n")
    assert plat._proc_driver(tmp_path) == [CudaDevice(0, "NVIDIA H200")]
    assert plat._proc_driver(tmp_path / "absent") == []


@pytest.mark.skipif(shutil.which("nvidia-smi") is None, reason="no CUDA device here (no nvidia-smi)")
def test_cuda_devices_match_nvidia_smi_list() -> None:
    listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
    assert len(plat.cuda_devices()) == len(listed.strip().splitlines())


def test_probe_imports_in_a_child_interpreter() -> None:
    plat.probe.cache_clear()
    lib = plat.probe("llamacpp", sys.executable)
    assert lib.installed and lib.imports and lib.version
    # The main venv stays lean: vLLM lives in .venv-vllm, never beside the API.
    assert not plat.probe("vllm", sys.executable).installed


def test_probe_reports_a_library_that_is_there_but_breaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "mlx_lm").mkdir()
    (tmp_path / "mlx_lm" / "__init__.py").write_text("raise ImportError('libmlx.so: cannot open')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    plat.probe.cache_clear()
    try:
        lib = plat.probe("mlx", sys.executable)
    finally:
        plat.probe.cache_clear()
    assert lib.installed and lib.imports is False
    assert lib.error is not None and "libmlx.so" in lib.error


@pytest.mark.skipif(not plat.cuda_devices(), reason="no CUDA device here")
def test_a_cuda_machine_picks_vllm_under_the_vllm_venv() -> None:
    python = _engines.venv_python("vllm")
    code = "from engines.platform import choose_engine; print(choose_engine(['llamacpp', 'vllm', 'mlx']))"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "vllm"
