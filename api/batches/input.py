"""Reading a batch input file: one request per JSONL line, each checked before the batch is accepted."""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import ValidationError

from api import errors, input_limits
from api.protocol.batches import RequestLine
from queueing.settings import Settings

# How many bad lines one error message names; the count says how many more there are.
_NAMED = 10
# Lines are checked as request bodies are (api.input_limits); the file was uploaded as a file, not a body.
_MAX_DEPTH: int = Settings.model_fields["max_json_depth"].default


@dataclass(frozen=True)
class InputLine:
    number: int  # 1-based line number in the file, as an editor shows it
    request: RequestLine


def parse(data: bytes, max_depth: int = _MAX_DEPTH) -> list[InputLine]:
    """The requests of a JSONL file. A file with lines that are not requests is refused as a whole (400),
    naming the bad lines: a request that is well-formed but wrong (another endpoint, an unknown model) is
    not judged here but answered in the batch's error file, so the rest of the batch still runs."""
    lines: list[InputLine] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        try:
            input_limits.check(raw, max_depth, f"Line {number}")
            request = RequestLine.model_validate(json.loads(raw))
        except errors.ApiError as exc:
            problems.append(exc.message[:1].lower() + exc.message[1:].rstrip("."))
            continue
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            problems.append(f"line {number} is not valid JSON ({exc})")
            continue
        except ValidationError as exc:
            problems.append(f"line {number}: {_describe(exc)}")
            continue
        first = seen.setdefault(request.custom_id, number)
        if first != number:
            problems.append(f"line {number} repeats custom_id {request.custom_id!r} of line {first}")
            continue
        lines.append(InputLine(number, request))
    if problems:
        more = f"; and {len(problems) - _NAMED} more" if len(problems) > _NAMED else ""
        raise errors.invalid_request(
            f"The input file has {len(problems)} invalid line(s): {'; '.join(problems[:_NAMED])}{more}.",
            "input_file_id",
            "invalid_batch_input",
        )
    if not lines:
        raise errors.invalid_request("The input file has no requests.", "input_file_id", "empty_file")
    return lines


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    if first["type"] == "model_type":
        return "not a JSON object with custom_id, method, url and body"
    message = str(first["msg"])
    return f"`{where}` {message[:1].lower()}{message[1:]}" if where else message
