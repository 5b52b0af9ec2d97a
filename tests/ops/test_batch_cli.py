"""`inferq batch`: line preparation and progress as pure logic; the commands against a stand-in server."""

from __future__ import annotations

import io
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner, Result

from ops import batch_cli, batch_client
from ops.batch_client import TERMINAL, Batch, MissingModel, prepare_lines
from ops.batch_progress import Display, Progress
from ops.cli import main


def _lines(data: bytes) -> list[Any]:
    return [json.loads(line) for line in data.decode().split("\n") if line]


# ---------------------------------------------------------------------------------------------- lines


def test_bare_bodies_become_full_lines_numbered_by_their_line() -> None:
    text = '{"messages": [{"role": "user", "content": "hi"}]}\n\n  \n{"messages": []}\n'
    data, endpoint = prepare_lines(text, "m", None)
    assert endpoint == "/v1/chat/completions"
    assert _lines(data) == [
        {
            "custom_id": "line-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": "hi"}], "model": "m"},
        },
        {
            "custom_id": "line-4",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"messages": [], "model": "m"},
        },
    ]
    # Blank lines stay, emptied, so that the server's line numbers in its errors are the file's.
    assert data.decode().split("\n")[1:4] == [
        "",
        "",
        '{"custom_id": "line-4", "method": "POST", '
        '"url": "/v1/chat/completions", "body": {"messages": [], "model": "m"}}',
    ]
    assert data.endswith(b"}\n")


def test_lines_are_split_on_newlines_only() -> None:
    data, _ = prepare_lines('{"prompt": "a\u2028b"}\r\n{"prompt": "c"}', "m", "/v1/completions")
    assert [line["body"]["prompt"] for line in _lines(data)] == ["a\u2028b", "c"]


def test_full_lines_are_kept_and_the_first_one_names_the_endpoint() -> None:
    full = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e", "input": "x"}}
    text = f'{{"input": "bare", "model": "e"}}\n{json.dumps(full)}\n'
    data, endpoint = prepare_lines(text, None, None)
    assert endpoint == "/v1/embeddings"
    bare, kept = _lines(data)
    assert kept == full
    assert bare == {
        "custom_id": "line-1",
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"input": "bare", "model": "e"},
    }


def test_an_explicit_endpoint_wins_over_the_lines() -> None:
    full = {"custom_id": "a", "method": "POST", "url": "/v1/embeddings", "body": {"model": "e"}}
    data, endpoint = prepare_lines(
        f'{json.dumps(full)}\n{{"prompt": "p", "model": "m"}}', None, "/v1/completions"
    )
    assert endpoint == "/v1/completions"
    assert [line["url"] for line in _lines(data)] == ["/v1/embeddings", "/v1/completions"]


def test_model_overrides_every_body() -> None:
    full = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": "old", "prompt": "p"},
    }
    text = f'{json.dumps(full)}\n{{"prompt": "q", "model": "older"}}'
    data, _ = prepare_lines(text, "new", None)
    assert [line["body"]["model"] for line in _lines(data)] == ["new", "new"]
    assert [line["custom_id"] for line in _lines(data)] == ["a", "line-2"]


def test_a_body_without_a_model_is_named_by_its_line() -> None:
    full = {"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"prompt": "p"}}
    text = f'{{"prompt": "x", "model": "m"}}\n\n{json.dumps(full)}\n{{"prompt": "y", "model": null}}\n'
    with pytest.raises(MissingModel, match="line 3, 4") as caught:
        prepare_lines(text, None, None)
    assert caught.value.lines == [3, 4]
    data, _ = prepare_lines(text, "m", None)
    assert len(_lines(data)) == 3


def test_lines_that_are_not_json_objects_pass_through_unchanged() -> None:
    text = '{"prompt": "x"}\nnot json {\n[1, 2]\n'
    data, _ = prepare_lines(text, "m", "/v1/completions")
    first, second, third = data.decode().splitlines()
    assert json.loads(first)["body"] == {"prompt": "x", "model": "m"}
    assert (second, third) == ("not json {", "[1, 2]")


# ---------------------------------------------------------------------------------------------- progress


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _batch(status: str, total: int = 0, completed: int = 0, failed: int = 0, **extra: Any) -> Batch:
    counts = {"total": total, "completed": completed, "failed": failed}
    return {"id": "batch_1", "object": "batch", "status": status, "request_counts": counts, **extra}


def test_progress_reports_token_rate_and_eta_from_the_in_progress_start() -> None:
    clock = Clock()
    progress = Progress(clock)
    assert progress.update(_batch("validating"))
    assert progress.render() == "[................] 0/0 done · 0 failed · validating"
    assert progress.update(_batch("in_progress", 200, 0, 0, usage={"output_tokens": 0}))
    assert progress.render() == "[................] 0/200 done · 0 failed"  # no time has passed: no rates yet
    clock.now += 10
    assert not progress.update(_batch("in_progress", 200, 98, 2, usage={"output_tokens": 3500}))
    # 100 lines in 10 s: 10 lines/s, so 100 left take 10 s.
    assert progress.render() == "[########........] 100/200 done · 2 failed · 350 tok/s · ETA 0:10"
    assert progress.rates() == (10.0, 350.0)


def test_progress_without_usage_omits_the_token_rate() -> None:
    clock = Clock()
    progress = Progress(clock)
    progress.update(_batch("in_progress", 10000, 0))
    clock.now += 4
    progress.update(_batch("in_progress", 10000, 2, usage=None))
    assert progress.render() == "[................] 2/10000 done · 0 failed · ETA 5:33:16"


def test_progress_shows_terminal_status_instead_of_rates() -> None:
    clock = Clock()
    progress = Progress(clock, width=4)
    progress.update(_batch("in_progress", 4, 0, usage={"output_tokens": 0}))
    clock.now += 1
    progress.update(_batch("completed", 4, 3, 1, usage={"output_tokens": 40}))
    assert progress.render() == "[####] 4/4 done · 1 failed · completed"


def test_display_without_a_tty_prints_on_status_changes_and_every_two_seconds() -> None:
    clock, out = Clock(), io.StringIO()
    display = Display(out, tty=False, clock=clock)
    for step in range(12):  # every 0.5 s
        display(_batch("validating" if step < 2 else "in_progress", 10, step))
        clock.now += 0.5
    printed = out.getvalue().splitlines()
    assert [line.split(" done")[0][-5:] for line in printed] == [" 0/10", " 2/10", " 6/10", "10/10"]
    assert printed[0].endswith("validating")


def test_display_on_a_tty_redraws_one_line() -> None:
    out = io.StringIO()
    display = Display(out, tty=True, clock=Clock())
    display(_batch("validating"))
    display(_batch("in_progress", 10, 1))
    display.close()
    display.close()
    text = out.getvalue()
    assert text.count("\r") == 2 and text.count("\n") == 1 and text.endswith("\n")


# ---------------------------------------------------------------------------------------------- commands


class FakeServer:
    """The Files and Batches routes, scripted: each poll returns the next status."""

    def __init__(self, statuses: list[str], total: int = 2) -> None:
        self.statuses = iter(statuses)
        self.total = total
        self.requests: list[httpx.Request] = []
        self.created: dict[str, Any] = {}
        self.batch: Batch = {}
        self.files = {
            "file-out": b'{"custom_id": "line-1"}\n{"custom_id": "line-2"}',
            "file-err": b'{"e": 1}\n',
        }
        self.fail: tuple[str, int, Any] | None = None  # (path, status, json) answered instead

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        path = request.url.path
        if self.fail and path == self.fail[0]:
            return httpx.Response(self.fail[1], json=self.fail[2])
        if path == "/v1/files":
            return httpx.Response(200, json={"id": "file-in", "object": "file", "purpose": "batch"})
        if path == "/v1/batches" and request.method == "POST":
            self.created = json.loads(request.content)
            self.batch = _batch("validating", id="batch_1", endpoint=self.created["endpoint"])
            return httpx.Response(200, json=self.batch)
        if path == "/v1/batches":
            return httpx.Response(200, json={"object": "list", "data": [self.batch], "has_more": False})
        if path == "/v1/batches/batch_1":
            status = next(self.statuses, self.batch["status"])
            done = self.total if status in TERMINAL else 0
            self.batch = {
                **self.batch,
                "status": status,
                "request_counts": {"total": self.total, "completed": done},
            }
            if status == "completed":
                self.batch.update(
                    output_file_id="file-out", error_file_id="file-err", completed_at=1_700_000_000
                )
            return httpx.Response(200, json=self.batch)
        if path == "/v1/batches/batch_1/cancel":
            self.batch = {**self.batch, "status": "cancelling"}
            return httpx.Response(200, json=self.batch)
        if path.startswith("/v1/files/") and path.endswith("/content"):
            return httpx.Response(200, content=self.files[path.split("/")[3]])
        return httpx.Response(404, json={"error": {"message": f"no route {path}", "type": "x", "code": None}})

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeServer]:
    fake = FakeServer(["validating", "in_progress", "in_progress", "completed"])
    real = batch_client.http_client

    def factory(base_url: str, api_key: str | None) -> httpx.Client:
        return real(base_url, api_key, transport=httpx.MockTransport(fake))

    monkeypatch.setattr(batch_cli, "http_client", factory)
    monkeypatch.setattr(batch_cli, "POLL_S", 0.0)
    for var in ("INFERQ_BASE_URL", "INFERQ_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    yield fake


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, ["batch", *args])


@pytest.fixture
def jsonl(tmp_path: Path) -> Path:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "a"}]}\n{"messages": []}\n')
    return path


def test_submit_uploads_creates_and_waits_until_completed(
    server: FakeServer, jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    result = _invoke(
        "submit", str(jsonl), "--model", "m", "--metadata", "team=a", "--metadata", "x=1=2", "--wait"
    )
    assert result.exit_code == 0, result.output
    assert server.paths() == ["POST /v1/files", "POST /v1/batches"] + ["GET /v1/batches/batch_1"] * 4
    assert all(r.headers["authorization"] == "Bearer sk-test" for r in server.requests)
    assert str(server.requests[0].url).startswith("http://127.0.0.1:8000/")
    upload = server.requests[0].content
    assert b'name="purpose"' in upload and b'filename="requests.jsonl"' in upload
    assert prepare_lines(jsonl.read_text(), "m", None)[0] in upload
    assert server.created == {
        "input_file_id": "file-in",
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
        "metadata": {"team": "a", "x": "1=2"},
    }
    assert result.stdout.splitlines() == ["batch_1", "batch_1 completed: 2 requests, 2 completed, 0 failed"]
    assert "validating" in result.stderr and "completed" in result.stderr


def test_submit_then_wait_returns_the_final_object(server: FakeServer, jsonl: Path) -> None:
    seen: list[str] = []
    http = batch_client.http_client("http://h", None, transport=httpx.MockTransport(server))
    with batch_client.BatchClient(http) as client:
        created = batch_client.submit(client, jsonl, model="m")
        final = batch_client.wait(client, created["id"], lambda b: seen.append(b["status"]), poll_s=0)
    assert final["status"] == "completed" and final["output_file_id"] == "file-out"
    assert seen == ["validating", "in_progress", "in_progress", "completed"]
    assert "authorization" not in server.requests[0].headers


@pytest.mark.parametrize("status", ["failed", "expired", "cancelled"])
def test_submit_wait_exits_1_unless_completed(server: FakeServer, jsonl: Path, status: str) -> None:
    server.statuses = iter(["in_progress", status])
    result = _invoke("--base-url", "http://elsewhere:9", "submit", str(jsonl), "--model", "m", "--wait")
    assert result.exit_code == 1
    assert f"batch_1 {status}" in result.stdout
    assert server.requests[0].url.host == "elsewhere"


def test_server_errors_print_their_message_and_exit_1(server: FakeServer, jsonl: Path) -> None:
    error = {
        "message": "Model 'nope' is not served.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "x",
    }
    server.fail = ("/v1/batches", 400, {"error": error})
    result = _invoke("submit", str(jsonl), "--model", "nope")
    assert result.exit_code == 1
    assert "Error: Model 'nope' is not served. (HTTP 400)" in result.stderr
    assert result.stdout == ""


def test_submit_without_a_model_names_the_line_and_sends_nothing(server: FakeServer, jsonl: Path) -> None:
    result = _invoke("submit", str(jsonl))
    assert result.exit_code == 1
    assert "line 1, 2" in result.stderr and "--model" in result.stderr
    assert server.requests == []


def test_bad_metadata_is_a_usage_error(server: FakeServer, jsonl: Path) -> None:
    result = _invoke("submit", str(jsonl), "--model", "m", "--metadata", "novalue")
    assert result.exit_code == 2 and "key=value" in result.stderr


def test_ctrl_c_stops_waiting_and_says_how_to_check(
    server: FakeServer, jsonl: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    result = _invoke("submit", str(jsonl), "--model", "m", "--wait")
    assert result.exit_code == 130
    assert "inferq batch status batch_1" in result.stderr
    assert "POST /v1/batches/batch_1/cancel" not in server.paths()


def test_results_writes_outputs_then_errors(server: FakeServer, jsonl: Path, tmp_path: Path) -> None:
    assert _invoke("submit", str(jsonl), "--model", "m").exit_code == 0
    early = _invoke("results", "batch_1", "-o", str(tmp_path / "early.jsonl"))
    assert early.exit_code == 1 and "no output or error file yet" in early.stderr
    out = tmp_path / "out.jsonl"
    result = _invoke("results", "batch_1", "-o", str(out), "--wait")
    assert result.exit_code == 0, result.output
    assert out.read_bytes() == b'{"custom_id": "line-1"}\n{"custom_id": "line-2"}\n{"e": 1}\n'
    assert "2 output lines, 1 error lines" in result.stderr
    to_stdout = _invoke("results", "batch_1", "-o", "-")
    assert to_stdout.stdout.splitlines() == out.read_text().splitlines()


def test_status_cancel_and_list(server: FakeServer, jsonl: Path) -> None:
    assert _invoke("submit", str(jsonl), "--model", "m").exit_code == 0
    server.statuses = iter(["in_progress", "in_progress", "completed"])
    text = _invoke("status", "batch_1").stdout
    assert "in_progress" in text and "0/2 done" in text and "output_file_id" not in text
    raw = json.loads(_invoke("status", "batch_1", "--json").stdout)
    assert raw["id"] == "batch_1" and raw["status"] == "in_progress"
    assert _invoke("cancel", "batch_1").stdout == "batch_1 cancelling\n"
    listed = _invoke("list", "--limit", "5")
    assert listed.stdout.startswith("batch_1  cancelling")
    assert server.requests[-1].url.params["limit"] == "5"
    text = _invoke("status", "batch_1").stdout
    assert "completed      2023-11-14 22:13:20 UTC" in text and "output_file_id file-out" in text
