"""Stop-string matching over streamed text, shared by every engine that does it outside the library."""

from __future__ import annotations


class StopMatcher:
    """Releases streamed text as soon as it cannot be the start of a stop string.

    Text that might still grow into a stop string is held back, so a client never sees part of one.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        # The stop string that ended the text (the earliest in it), once ``stopped``.
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add new text; return what may be released. Sets ``stopped`` when a stop string completed."""
        if not self._stops:
            return text
        held = self._held + text
        hits = [(i, s) for s in self._stops if (i := held.find(s)) >= 0]
        if hits:
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            self._held = ""
            self.stopped = True
            return held[:cut]
        keep = self._longest_partial(held)
        self._held = held[len(held) - keep :] if keep else ""
        return held[: len(held) - keep]

    def flush(self) -> str:
        """Release whatever was held back (the generation ended for another reason)."""
        held, self._held = self._held, ""
        return held

    def _longest_partial(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
