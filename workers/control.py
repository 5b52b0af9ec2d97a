"""Remote-control commands (Celery broadcast) the management API sends to one worker: load, unload, pin.

They run on the consumer's event loop, so anything slow (loading weights, waiting for a model's running
jobs to finish) goes to a thread and the command returns at once; the registry shows the progress.
"""

from __future__ import annotations

import threading
from typing import Any

from celery.worker.control import control_command

from queueing import keys
from workers.runtime import get_runtime


def _in_background(target: Any, *args: Any) -> None:
    threading.Thread(target=target, args=args, daemon=True, name="inferq-model-change").start()


@control_command(name=keys.CONTROL_LOAD, args=[("model", str)], signature="<model>")  # type: ignore[untyped-decorator]
def load(
    state: Any, model: str, pinned: bool = False, keep_alive: float | None = None, **_: Any
) -> dict[str, str]:
    """Load a catalog model and start consuming its queue."""
    _in_background(get_runtime().load_model, model, pinned, keep_alive)
    return {"ok": f"loading {model}"}


@control_command(name=keys.CONTROL_UNLOAD, args=[("model", str)], signature="<model>")  # type: ignore[untyped-decorator]
def unload(state: Any, model: str, **_: Any) -> dict[str, str]:
    """Stop consuming a model's queue and unload it once its running jobs finished."""
    _in_background(get_runtime().models.unload, model)
    return {"ok": f"unloading {model}"}


@control_command(name=keys.CONTROL_PIN, args=[("model", str)], signature="<model>")  # type: ignore[untyped-decorator]
def pin(state: Any, model: str, pinned: bool = True, **_: Any) -> dict[str, str]:
    """Pin (never evict) or unpin a loaded model."""
    found = get_runtime().models.pin(model, pinned)
    return {"ok": f"{model} pinned={pinned}"} if found else {"error": f"{model} is not loaded"}
