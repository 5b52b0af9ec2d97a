"""Coalescing a stream's deltas: at once while the engine is slow, gathered while it is fast."""

from __future__ import annotations

from queueing.events import TokenLogprob
from workers.coalesce import Coalescer


def lp(token: str) -> list[TokenLogprob]:
    return [TokenLogprob(token=token, logprob=-1.0, top=[])]


def test_the_first_token_and_a_slow_engines_tokens_go_at_once() -> None:
    c = Coalescer(window=0.015, most=64)
    assert c.add("a", None, now=100.0) == ("a", None, 1)
    # 20 ms apart: slower than the window, each goes as it comes.
    assert c.add("b", None, now=100.020) == ("b", None, 1)
    assert c.add("c", None, now=100.040) == ("c", None, 1)
    assert c.flush() is None


def test_fast_tokens_are_gathered_until_the_window_passes() -> None:
    c = Coalescer(window=0.015, most=64)
    assert c.add("a", lp("a"), now=0.0) == ("a", lp("a"), 1)
    assert c.add("b", lp("b"), now=0.001) is None
    assert c.add("c", None, now=0.002) is None
    assert c.add("d", lp("d"), now=0.016) == ("bcd", lp("b") + lp("d"), 3)
    assert c.add("e", None, now=0.017) is None
    # The stream's end sends what is pending.
    assert c.flush() == ("e", None, 1)
    assert c.flush() is None


def test_at_most_so_many_tokens_wait() -> None:
    c = Coalescer(window=10.0, most=3)
    sent = [c.add(t, None, now=0.0) for t in "abcdefg"]
    assert sent == [("a", None, 1), None, None, ("bcd", None, 3), None, None, ("efg", None, 3)]


def test_a_zero_window_sends_every_token() -> None:
    c = Coalescer(window=0.0, most=1)
    assert [c.add(t, None, now=0.0) for t in "abc"] == [("a", None, 1), ("b", None, 1), ("c", None, 1)]
