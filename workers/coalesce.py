"""A stream's deltas, sent as they come while the engine is slow and gathered while it is fast.

Every delta a worker sends costs a Redis PUBLISH, a decode and an SSE chunk in the API: with an engine that
produces tokens faster than that path moves them (vLLM with hundreds of streams, a zero-cost engine), the
path, not the engine, sets the pace. So a delta goes out at once when the last one went out at least
``window`` seconds ago (the first token always: time to first token does not change, nor does a CPU
engine's token-by-token stream), and otherwise waits, gathered with the next ones, until the window has
passed or ``most`` tokens are pending. Like vLLM's and SGLang's ``stream_interval``, with a time bound. A
held token goes out with the next one (or at the stream's end): an engine that stalls right after a quick
token holds that token for the stall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from queueing import events


@dataclass
class Coalescer:
    window: float
    most: int
    _text: list[str] = field(default_factory=list)
    _logprobs: list[events.TokenLogprob] = field(default_factory=list)
    _pending: int = 0
    _sent_at: float = -math.inf

    def add(
        self, text: str, logprobs: list[events.TokenLogprob] | None, now: float
    ) -> tuple[str, list[events.TokenLogprob] | None, int] | None:
        """One engine output; returns what to send now (text, logprobs, tokens), or None to wait."""
        self._text.append(text)
        if logprobs:
            self._logprobs.extend(logprobs)
        self._pending += 1
        if self._pending < self.most and now - self._sent_at < self.window:
            return None
        self._sent_at = now
        return self.flush()

    def flush(self) -> tuple[str, list[events.TokenLogprob] | None, int] | None:
        """What is pending, or None; the stream's end sends it before the finish."""
        if not self._pending:
            return None
        out = "".join(self._text), self._logprobs or None, self._pending
        self._text, self._logprobs, self._pending = [], [], 0
        return out
