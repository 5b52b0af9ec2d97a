"""`inferq models prepare`: derive an engine's model folder from another engine's source, once, into the
cache.

vLLM (0.32, CPU) cannot load GGUF and mlx_lm reads Hugging Face folders, so the catalog's ``prepared_from``
sources are made from the packaged GGUF by ``ops/convert_gguf.py``. Nothing is downloaded from a hub.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from queueing.catalog import Catalog

logger = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
CONVERTER_MODULES = ("torch", "transformers", "gguf", "accelerate")


class PrepareError(RuntimeError):
    pass


def converter_python(engine: str) -> str:
    """An interpreter that can run the converter: this one, else the engine's venv (``.venv-<engine>``)."""
    candidates = [sys.executable, str(ROOT / f".venv-{engine}" / "bin" / "python")]
    check = "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))"
    for python in candidates:
        if (
            Path(python).exists()
            and subprocess.run([python, "-c", check, *CONVERTER_MODULES]).returncode == 0
        ):
            return python
    raise PrepareError(
        f"converting needs {', '.join(CONVERTER_MODULES)}: run this under an engine venv "
        f"(`make engine-{engine}`) or pass --python"
    )


def prepare(
    catalog: Catalog, model: str, engine: str, python: str | None = None, force: bool = False
) -> Path:
    """The prepared folder of ``model`` for ``engine``, converting it first if it is not in the cache."""
    spec = catalog.get(model)
    if spec is None:
        raise PrepareError(f"model {model!r} is not in the catalog")
    source = spec.sources.get(engine)
    if source is None or source.prepared_from is None:
        raise PrepareError(f"model {model!r} has no prepared source for engine {engine!r}")
    out = source.prepared_dir()
    if (out / "config.json").is_file() and not force:
        return out
    gguf = spec.sources[source.prepared_from].resolve()
    python = python or converter_python(engine)
    # Convert into a scratch folder beside the target and rename it into place: a converter killed halfway
    # never leaves a folder that looks prepared.
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_name(f".{out.name}.{os.getpid()}")
    shutil.rmtree(scratch, ignore_errors=True)
    started = time.perf_counter()
    done = subprocess.run(
        [python, "-m", "ops.convert_gguf", str(gguf), str(scratch)],
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        shutil.rmtree(scratch, ignore_errors=True)
        raise PrepareError(f"converting {gguf} failed:\n{done.stderr[-4000:]}")
    shutil.rmtree(out, ignore_errors=True)
    scratch.rename(out)
    logger.info("prepared %s for %s in %s (%.1fs)", model, engine, out, time.perf_counter() - started)
    return out
