"""`inferq batch`: submit a JSONL file to the Batch API, follow it, fetch its results (a plain HTTP client:
see ops/batch_client.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import httpx

from ops.batch_client import (
    DEFAULT_BASE_URL,
    DEFAULT_ENDPOINT,
    ENDPOINTS,
    POLL_S,
    APIError,
    Batch,
    BatchClient,
    MissingModel,
    http_client,
    submit,
    wait,
)
from ops.batch_progress import Display, counts, summary, when


def parse_metadata(pairs: tuple[str, ...]) -> dict[str, str]:
    metadata = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not key=value", param_hint="--metadata")
        metadata[key] = value
    return metadata


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
    total, completed, failed = counts(batch)
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
        total, completed, failed = counts(item)
        created = when(item["created_at"]) if item.get("created_at") else "-"
        click.echo(
            f"{item['id']}  {item.get('status'):<11}  {completed + failed}/{total} done  "
            f"{created}  {item.get('endpoint')}  {item.get('model') or '-'}"
        )
