from __future__ import annotations

import pytest

from engines.stops import StopMatcher


def feed(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    m = StopMatcher(stops)
    out = ""
    for p in pieces:
        out += m.push(p)
        if m.stopped:
            return out, True
    return out + m.flush(), False


def test_no_stops_passes_everything_through() -> None:
    assert feed([], ["a", "b"]) == ("ab", False)


def test_stop_inside_one_piece_cuts_before_it() -> None:
    assert feed(["END"], ["hello END world"]) == ("hello ", True)


def test_stop_split_across_pieces_is_never_shown() -> None:
    m = StopMatcher(["</s>"])
    assert m.push("ab<") == "ab"
    assert m.push("/") == ""
    assert m.push("s>tail") == ""
    assert m.stopped


def test_held_text_is_released_when_it_stops_matching() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("ST") == ""
    assert m.push("AR") == "STAR"
    assert not m.stopped


def test_flush_releases_a_held_partial_at_the_end() -> None:
    assert feed(["xyz"], ["abc", "x"]) == ("abcx", False)


@pytest.mark.parametrize(
    ("stops", "text", "expected"),
    [(["b", "ab"], "xxab", "xx"), (["bc", "c"], "abc", "a"), ([".", "\n"], "one\ntwo.", "one")],
)
def test_earliest_stop_wins(stops: list[str], text: str, expected: str) -> None:
    assert feed(stops, list(text)) == (expected, True)


@pytest.mark.parametrize(
    ("stops", "text", "matched"),
    [(["b", "ab"], "xxab", "ab"), (["3", "\n"], "1, 2, 3, 4", "3"), (["zz"], "abc", None)],
)
def test_the_matched_stop_string_is_recorded(stops: list[str], text: str, matched: str | None) -> None:
    m = StopMatcher(stops)
    for c in text:
        m.push(c)
    assert m.matched == matched and m.stopped == (matched is not None)
