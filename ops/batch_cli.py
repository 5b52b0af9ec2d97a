"""`inferq batch`: submit a JSONL file to the Batch API, follow it, fetch its results.

A plain HTTP client of the OpenAI-shaped Files and Batches routes, so it works against any inferq (or OpenAI)
server and imports nothing of the server side.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import click
import httpx

Batch = dict[str, Any]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
DEFAULT_ENDPOINT = ENDPOINTS[0]
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
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
POLL_S = 0.5
PLAIN_EVERY_S = 2.0  # without a TTY, a progress line at most this often (and on every status change)
_FULL_LINE_KEYS = ("custom_id", "method", "url")


class MissingModel(ValueError):
    def __init__(self, lines: list[int]) -> None:
        self.lines = lines
        shown = ", ".join(map(str, lines[:10])) + (", …" if len(lines) > 10 else "")
        super().__init__(f'line {shown}: no "model" in the request body; pass --model or add one')


class APIError(Exception):
    """A non-2xx answer, carrying the OpenAI error envelope's fields."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        self.status, self.message, self.code = status, message, code
        super().__init__(f"{message} (HTTP {status})")


# ---------------------------------------------------------------------------------------------- pure logic


def _is_full_line(obj: object) -> bool:
    return isinstance(obj, dict) and "body" in obj and any(k in obj for k in _FULL_LINE_KEYS)


def prepare_lines(text: str, model: str | None, endpoint: str | None) -> tuple[bytes, str]:
    """The JSONL to upload and the batch's endpoint.

    Bare request bodies become full lines with ``custom_id`` ``line-<n>`` (the 1-based line in ``text``);
    ``model`` overrides every body's model. Lines that are not JSON objects go through unchanged, for the
    server to report. Blank lines stay (empty) so that the server's line numbers are the file's.
    """
    parsed: list[tuple[int, str, object]] = []
    # Split on "\n" alone, as the server does: str.splitlines() would also split inside JSON strings (U+2028).
    raws = text.split("\n")
    if raws[-1] == "":
        raws.pop()
    for n, raw in enumerate(raws, start=1):
        if not raw.strip():
            parsed.append((n, "", None))
            continue
        try:
            parsed.append((n, raw, json.loads(raw)))
        except ValueError:
            parsed.append((n, raw, None))
    if endpoint is None:
        urls = [obj["url"] for _, _, obj in parsed if _is_full_line(obj) and isinstance(obj, dict)]
        endpoint = urls[0] if urls and isinstance(urls[0], str) else DEFAULT_ENDPOINT
    out: list[str] = []
    missing: list[int] = []
    for n, raw, obj in parsed:
        if not isinstance(obj, dict):
            out.append(raw)
            continue
        line = obj if _is_full_line(obj) else {"custom_id": f"line-{n}", "method": "POST", "url": endpoint}
        body = obj.get("body") if line is obj else obj
        if isinstance(body, dict):
            body = {**body, "model": model} if model is not None else body
            if body.get("model") is None:
                missing.append(n)
        line = {**line, "body": body}
        out.append(json.dumps(line, ensure_ascii=False))
    if missing:
        raise MissingModel(missing)
    return "".join(f"{line}\n" for line in out).encode(), endpoint


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--metadata")
        metadata[key] = value
    return metadata


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _counts(batch: Batch) -> tuple[int, int, int]:
    counts = batch.get("request_counts") or {}
    return int(counts.get("total") or 0), int(counts.get("completed") or 0), int(counts.get("failed") or 0)


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
            _, completed, failed = _counts(batch)
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
        _, completed, failed = _counts(self.batch)
        tokens = _output_tokens(self.batch)
        token_rate = (tokens - tokens0) / elapsed if tokens is not None and tokens0 is not None else None
        return (completed + failed - done0) / elapsed, token_rate

    def render(self) -> str:
        total, completed, failed = _counts(self.batch)
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


def _when(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def summary(batch: Batch) -> str:
    """A short human account of a batch object."""
    total, completed, failed = _counts(batch)
    rows = [
        ("id", batch.get("id")),
        ("status", batch.get("status")),
        ("endpoint", batch.get("endpoint")),
        ("model", batch.get("model")),
        ("requests", f"{completed + failed}/{total} done ({completed} completed, {failed} failed)"),
    ]
    rows += [(key.removesuffix("_at"), _when(batch[key])) for key in TIMESTAMPS if batch.get(key)]
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


# ---------------------------------------------------------------------------------------------- HTTP


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    message, code = response.text or response.reason_phrase, None
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if isinstance(error, dict) and error.get("message"):
        message, code = str(error["message"]), error.get("code")
    raise APIError(response.status_code, message, code)


class BatchClient:
    """The Files and Batches routes over one ``httpx.Client``."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def __enter__(self) -> BatchClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _json(self, method: str, url: str, **kwargs: Any) -> Any:
        response = self.http.request(method, url, **kwargs)
        _raise_for_error(response)
        return response.json()

    def upload(self, name: str, data: bytes) -> str:
        files = {"file": (name, data, "application/jsonl")}
        return str(self._json("POST", "/v1/files", files=files, data={"purpose": "batch"})["id"])

    def create(self, file_id: str, endpoint: str, window: str, metadata: dict[str, str]) -> Batch:
        body = {"input_file_id": file_id, "endpoint": endpoint, "completion_window": window}
        result: Batch = self._json("POST", "/v1/batches", json={**body, "metadata": metadata})
        return result

    def get(self, batch_id: str) -> Batch:
        result: Batch = self._json("GET", f"/v1/batches/{batch_id}")
        return result

    def cancel(self, batch_id: str) -> Batch:
        result: Batch = self._json("POST", f"/v1/batches/{batch_id}/cancel")
        return result

    def list_batches(self, limit: int) -> list[Batch]:
        result: list[Batch] = self._json("GET", "/v1/batches", params={"limit": limit})["data"]
        return result

    def content(self, file_id: str) -> bytes:
        response = self.http.get(f"/v1/files/{file_id}/content")
        _raise_for_error(response)
        return response.content


def http_client(
    base_url: str, api_key: str | None, transport: httpx.BaseTransport | None = None
) -> httpx.Client:
    """The factory every command gets its connection from (tests pass an ``httpx.MockTransport``)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    timeout = httpx.Timeout(60.0, connect=10.0)
    return httpx.Client(base_url=base_url, headers=headers, timeout=timeout, transport=transport)


def submit(
    client: BatchClient,
    path: Path,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
) -> Batch:
    """Prepare ``path`` (see `prepare_lines`), upload it and create the batch; the new batch object."""
    data, endpoint = prepare_lines(path.read_text(encoding="utf-8"), model, endpoint)
    file_id = client.upload(path.name, data)
    return client.create(file_id, endpoint, completion_window, metadata or {})


def wait(
    client: BatchClient,
    batch_id: str,
    on_update: Callable[[Batch], None] | None = None,
    poll_s: float = POLL_S,
) -> Batch:
    """Poll until the batch reaches a terminal status; the final object."""
    while True:
        batch = client.get(batch_id)
        if on_update is not None:
            on_update(batch)
        if batch.get("status") in TERMINAL:
            return batch
        time.sleep(poll_s)


def submit_and_wait(
    client: BatchClient,
    path: Path,
    *,
    model: str | None = None,
    endpoint: str | None = None,
    completion_window: str = "24h",
    metadata: dict[str, str] | None = None,
    on_update: Callable[[Batch], None] | None = None,
    poll_s: float = POLL_S,
) -> Batch:
    """`submit` then `wait`: the batch object in its terminal status."""
    batch = submit(
        client, path, model=model, endpoint=endpoint, completion_window=completion_window, metadata=metadata
    )
    return wait(client, batch["id"], on_update, poll_s)


# ---------------------------------------------------------------------------------------------- commands


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


class _BatchGroup(click.Group):
    # Server and connection errors become one-line messages and exit 1, for every subcommand alike.
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except APIError as exc:
            raise click.ClickException(str(exc)) from exc
        except httpx.TransportError as exc:
            url = ctx.params.get("base_url")
            raise click.ClickException(f"cannot reach {url}: {exc}") from exc


@click.group(cls=_BatchGroup)
@click.option(
    "--base-url",
    envvar="INFERQ_BASE_URL",
    default=DEFAULT_BASE_URL,
    show_default=True,
    help="(INFERQ_BASE_URL)",
)
@click.option(
    "--api-key",
    envvar=["INFERQ_API_KEY", "OPENAI_API_KEY"],
    default=None,
    help="Sent as Authorization: Bearer (INFERQ_API_KEY, else OPENAI_API_KEY).",
)
@click.pass_context
def batch(ctx: click.Context, base_url: str, api_key: str | None) -> None:
    """Batch API jobs: submit a JSONL file, follow it, fetch its results."""
    ctx.obj = ctx.with_resource(BatchClient(http_client(base_url, api_key)))


def _wait_visibly(client: BatchClient, batch_id: str) -> Batch | None:
    """Wait with progress on stderr; None when the user stopped waiting with Ctrl-C."""
    display = Display(sys.stderr, sys.stderr.isatty())
    try:
        return wait(client, batch_id, display, POLL_S)
    except KeyboardInterrupt:
        display.close()
        click.echo(
            f"stopped waiting; {batch_id} goes on. Check it with `inferq batch status {batch_id}`.", err=True
        )
        return None
    finally:
        display.close()


def _final(batch: Batch) -> None:
    total, completed, failed = _counts(batch)
    click.echo(f"{batch['id']} {batch['status']}: {total} requests, {completed} completed, {failed} failed")
    for err in (batch.get("errors") or {}).get("data") or []:
        click.echo(f"  line {err.get('line')}: {err.get('message')} [{err.get('code')}]", err=True)
    if batch["status"] != "completed":
        raise SystemExit(1)


@batch.command("submit")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", default=None, help="Set every request's model.")
@click.option(
    "--endpoint",
    type=click.Choice(ENDPOINTS),
    default=None,
    help=f"Default: the url of the first full line, else {DEFAULT_ENDPOINT}.",
)
@click.option("--completion-window", default="24h", show_default=True)
@click.option("--metadata", multiple=True, metavar="KEY=VALUE", help="Repeatable.")
@click.option("--wait", "wait_", is_flag=True, help="Follow progress; exit 0 only if it completes.")
@click.pass_obj
def submit_command(
    client: BatchClient,
    file: Path,
    model: str | None,
    endpoint: str | None,
    completion_window: str,
    metadata: tuple[str, ...],
    wait_: bool,
) -> None:
    """Upload FILE (request bodies or full batch lines, one per line) and create a batch; print its id."""
    pairs = parse_metadata(metadata)
    try:
        created = submit(
            client, file, model=model, endpoint=endpoint, completion_window=completion_window, metadata=pairs
        )
    except MissingModel as exc:
        raise click.ClickException(f"{file}: {exc}") from exc
    click.echo(created["id"])
    if wait_:
        final = _wait_visibly(client, created["id"])
        if final is None:
            raise SystemExit(130)
        _final(final)


@batch.command("status")
@click.argument("batch_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help="The raw batch object.")
@click.pass_obj
def status_command(client: BatchClient, batch_id: str, as_json: bool) -> None:
    """A batch's status, request counts, timestamps, files and errors."""
    found = client.get(batch_id)
    click.echo(json.dumps(found, indent=2) if as_json else summary(found))


@batch.command("results")
@click.argument("batch_id", metavar="ID")
@click.option("-o", "--output", required=True, help="File to write (outputs, then errors); - for stdout.")
@click.option("--wait", "wait_", is_flag=True, help="Wait for a terminal status first.")
@click.pass_obj
def results_command(client: BatchClient, batch_id: str, output: str, wait_: bool) -> None:
    """Download a batch's output and error files into one JSONL."""
    found = _wait_visibly(client, batch_id) if wait_ else client.get(batch_id)
    if found is None:
        raise SystemExit(130)
    ids = {"output": found.get("output_file_id"), "error": found.get("error_file_id")}
    if not any(ids.values()):
        raise click.ClickException(
            f"{batch_id} has no output or error file yet (status {found.get('status')}); try --wait"
        )
    counts = {}
    with click.open_file(output, "wb") as out:
        for kind, file_id in ids.items():
            data = client.content(file_id) if file_id else b""
            if data and not data.endswith(b"\n"):
                data += b"\n"
            out.write(data)
            counts[kind] = sum(1 for line in data.splitlines() if line.strip())
    where = "stdout" if output == "-" else output
    click.echo(f"{counts['output']} output lines, {counts['error']} error lines -> {where}", err=True)


@batch.command("cancel")
@click.argument("batch_id", metavar="ID")
@click.pass_obj
def cancel_command(client: BatchClient, batch_id: str) -> None:
    """Ask the server to cancel a batch; print its new status."""
    found = client.cancel(batch_id)
    click.echo(f"{found['id']} {found['status']}")


@batch.command("list")
@click.option("--limit", type=click.IntRange(1, 100), default=20, show_default=True)
@click.pass_obj
def list_command(client: BatchClient, limit: int) -> None:
    """Recent batches, one line each."""
    for item in client.list_batches(limit):
        total, completed, failed = _counts(item)
        created = _when(item["created_at"]) if item.get("created_at") else "-"
        click.echo(
            f"{item['id']}  {item.get('status'):<11}  {completed + failed}/{total} done  "
            f"{created}  {item.get('endpoint')}  {item.get('model') or '-'}"
        )
