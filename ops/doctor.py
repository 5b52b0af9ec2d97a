"""`inferq doctor`: what this machine has, which engine libraries import under which interpreter, and the
engine a worker would choose automatically or could be forced to."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from engines.platform import ENGINE_MODULES, EngineLibrary, Platform, detect, pick, probe

ROOT = Path(__file__).resolve().parent.parent


def interpreters() -> list[str]:
    """This interpreter and the engine venvs beside the checkout (``.venv-vllm``, ``.venv-mlx``)."""
    found = [sys.executable]
    for engine in ENGINE_MODULES:
        python = ROOT / f".venv-{engine}" / "bin" / "python"
        if python.exists() and str(python) not in found:
            found.append(str(python))
    return found


@dataclass
class Report:
    machine: Platform
    libraries: list[EngineLibrary]
    automatic: dict[str, str]  # interpreter -> engine a worker under it chooses by itself

    def forceable(self) -> list[str]:
        return sorted({lib.engine for lib in self.libraries if lib.imports})


def diagnose(pythons: list[str] | None = None) -> Report:
    machine = detect()
    pythons = pythons or interpreters()
    libraries = [probe(engine, python) for python in pythons for engine in ENGINE_MODULES]
    automatic = {}
    for python in pythons:
        ok = {lib.engine for lib in libraries if lib.python == python and lib.imports}
        automatic[python] = pick(list(ENGINE_MODULES), machine, ok.__contains__)
    return Report(machine, libraries, automatic)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)]


def _short(python: str) -> str:
    path = Path(python)
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else python


def render(report: Report) -> str:
    m = report.machine
    gpus = ", ".join(
        f"{d.index}: {d.name}" + (f" ({d.memory_mib} MiB)" if d.memory_mib else "") for d in m.cuda_devices
    )
    lines = _table(
        ["platform", "value"],
        [
            ["os / arch", f"{m.os} / {m.arch}"],
            ["apple silicon", "yes" if m.apple_silicon else "no"],
            ["cuda devices", f"{len(m.cuda_devices)}" + (f" ({gpus})" if gpus else "")],
            ["ram total / free", f"{m.ram_total_mib} / {m.ram_free_mib} MiB"],
        ],
    )
    rows = []
    for lib in report.libraries:
        if not lib.installed and lib.python != sys.executable:
            continue  # an engine venv holds its own engine; the rest is noise
        imports = "-" if lib.imports is None else ("yes" if lib.imports else "NO")
        note = lib.error or ""
        if lib.imports:
            note = "automatic" if report.automatic[lib.python] == lib.engine else "forceable (--engine)"
        rows.append(
            [
                lib.engine,
                _short(lib.python),
                "yes" if lib.installed else "no",
                imports,
                lib.version or "",
                note,
            ]
        )
    lines += ["", *_table(["engine", "python", "installed", "imports", "version", "choice"], rows), ""]
    for python, engine in report.automatic.items():
        lines.append(f"automatic choice for a worker under {_short(python)}: {engine}")
    lines.append(f"forceable with `inferq worker --engine`: {', '.join(report.forceable()) or 'none'}")
    return "\n".join(lines)
