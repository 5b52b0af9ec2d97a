"""How `inferq batch` shows a batch: a progress line (done / failed, tokens/s, ETA) and a summary."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import IO

from ops.batch_client import Batch

TIMESTAMPS = (
    "created_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "expires_at",
)
PLAIN_EVERY_S = 2.0  # without a TTY, a progress line at most this often (and on every status change)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def counts(batch: Batch) -> tuple[int, int, int]:
    """(total, completed, failed) of a batch object."""
    found = batch.get("request_counts") or {}
    return int(found.get("total") or 0), int(found.get("completed") or 0), int(found.get("failed") or 0)


def _output_tokens(batch: Batch) -> int | None:
    usage = batch.get("usage")
    return int(usage.get("output_tokens") or 0) if isinstance(usage, dict) else None


class Progress:
    """Successive batch objects in, one progress line out.

    "done" counts finished lines (completed + failed). Rates are measured from the first object seen
    in_progress (or later), with ``clock``, so a watch that starts late still reports current speeds.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic, width: int = 16) -> None:
        self.clock, self.width = clock, width
        self.batch: Batch = {}
        self._base: tuple[float, int, int | None] | None = None  # (time, lines done, output tokens)

    def update(self, batch: Batch) -> bool:
        """Take the latest object; whether its status changed."""
        changed = batch.get("status") != self.batch.get("status")
        self.batch = batch
        if self._base is None and batch.get("status") not in ("validating", None):
            _, completed, failed = counts(batch)
            self._base = (self.clock(), completed + failed, _output_tokens(batch))
        return changed

    def rates(self) -> tuple[float | None, float | None]:
        """(lines/s, output tokens/s) since the base; None where unknown."""
        if self._base is None:
            return None, None
        t0, done0, tokens0 = self._base
        elapsed = self.clock() - t0
        if elapsed <= 0:
            return None, None
        _, completed, failed = counts(self.batch)
        tokens = _output_tokens(self.batch)
        token_rate = (tokens - tokens0) / elapsed if tokens is not None and tokens0 is not None else None
        return (completed + failed - done0) / elapsed, token_rate

    def render(self) -> str:
        total, completed, failed = counts(self.batch)
        done = completed + failed
        filled = self.width * done // total if total else 0
        parts = [f"[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} done", f"{failed} failed"]
        line_rate, token_rate = self.rates()
        status = self.batch.get("status")
        if token_rate is not None and status == "in_progress":
            parts.append(f"{token_rate:.0f} tok/s")
        if line_rate and status == "in_progress" and total:
            parts.append(f"ETA {_clock((total - done) / line_rate)}")
        if status != "in_progress":
            parts.append(str(status))
        return " · ".join(parts)


def when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary(batch: Batch) -> str:
    """A short human account of a batch object."""
    total, completed, failed = counts(batch)
    rows = [
        ("id", batch.get("id")),
        ("status", batch.get("status")),
        ("endpoint", batch.get("endpoint")),
        ("model", batch.get("model")),
        ("requests", f"{completed + failed}/{total} done ({completed} completed, {failed} failed)"),
    ]
    rows += [(key.removesuffix("_at"), when(batch[key])) for key in TIMESTAMPS if batch.get(key)]
    rows += [(key, batch.get(key)) for key in ("input_file_id", "output_file_id", "error_file_id")]
    usage = batch.get("usage")
    if isinstance(usage, dict):
        rows.append(("tokens", f"{usage.get('input_tokens')} in, {usage.get('output_tokens')} out"))
    lines = [f"{key:<15}{value}" for key, value in rows if value is not None]
    errors = (batch.get("errors") or {}).get("data") or []
    if errors:
        lines.append("errors:")
    for err in errors:
        where = f"line {err['line']}: " if err.get("line") is not None else ""
        lines.append(f"  {where}{err.get('message')} [{err.get('code')}]")
    return "\n".join(lines)


class Display:
    """Draws `Progress` on ``stream``: a bar redrawn in place on a TTY, else a line every few seconds."""

    def __init__(self, stream: IO[str], tty: bool, clock: Callable[[], float] = time.monotonic) -> None:
        self.stream, self.tty, self.clock = stream, tty, clock
        self.progress = Progress(clock)
        self._last_print: float | None = None
        self._width = 0

    def __call__(self, batch: Batch) -> None:
        changed = self.progress.update(batch)
        line = self.progress.render()
        if self.tty:
            # Pad over the remains of a longer previous line.
            self.stream.write(f"\r{line}{' ' * max(0, self._width - len(line))}")
            self._width = len(line)
        elif changed or self._last_print is None or self.clock() - self._last_print >= PLAIN_EVERY_S:
            self.stream.write(f"{line}\n")
            self._last_print = self.clock()
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
            self._width = 0
