"""Reading batch input files: what is refused as a whole, with which line numbers."""

from __future__ import annotations

import json

import pytest

from api import errors
from api.batches.input import parse


def row(custom_id: str, **extra: object) -> bytes:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body, **extra}
    return json.dumps(line).encode() + b"\n"


def refused(data: bytes) -> str:
    with pytest.raises(errors.ApiError) as caught:
        parse(data)
    assert caught.value.status == 400 and caught.value.param == "input_file_id"
    return caught.value.message


def test_good_file_keeps_order_and_line_numbers() -> None:
    lines = parse(row("a") + b"\n" + row("b") + row("c").rstrip(b"\n"))
    assert [(x.number, x.request.custom_id) for x in lines] == [(1, "a"), (3, "b"), (4, "c")]


def test_every_bad_line_is_named() -> None:
    data = row("a") + b"{oops\n" + row("a") + b"[1, 2]\n" + row("b", method="GET") + b'{"custom_id": "c"}\n'
    message = refused(data)
    assert message.startswith("The input file has 5 invalid line(s)")
    assert "line 2 is not valid JSON" in message
    assert "line 3 repeats custom_id 'a' of line 1" in message
    assert "line 4: not a JSON object" in message
    assert "line 5: `method` input should be 'POST'" in message
    assert "line 6: `url` field required" in message


def test_not_utf8_and_empty_files() -> None:
    assert "line 1 is not valid JSON" in refused(b"\xff\xfe\n")
    with pytest.raises(errors.ApiError) as caught:
        parse(b"\n\n")
    assert caught.value.code == "empty_file"


def test_long_lists_are_cut_short() -> None:
    message = refused(b"x\n" * 25)
    assert "line 10 " in message and "line 11 " not in message and "and 15 more" in message
