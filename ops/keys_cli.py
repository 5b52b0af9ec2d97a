"""`inferq keys`: create, list and revoke managed API keys through the admin API (``/v1/system/keys``);
`inferq usage`: the usage ledger (``/v1/system/usage``)."""

from __future__ import annotations

from typing import Any

import click
import httpx

from ops.batch_client import DEFAULT_BASE_URL, http_client

_LIMITS = ("rpm", "tpm", "max_concurrent", "monthly_tokens", "max_priority")


def _call(client: httpx.Client, method: str, path: str, **kwargs: Any) -> Any:
    try:
        r = client.request(method, path, **kwargs)
    except httpx.TransportError as exc:
        raise click.ClickException(f"cannot reach {client.base_url}: {exc}") from exc
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = r.text
        raise click.ClickException(f"{message} (HTTP {r.status_code})")
    return r.json()


@click.group()
@click.option("--base-url", envvar="INFERQ_BASE_URL", default=DEFAULT_BASE_URL, show_default=True)
@click.option("--admin-key", envvar="INFERQ_ADMIN_KEY", default=None, help="(INFERQ_ADMIN_KEY)")
@click.pass_context
def keys(ctx: click.Context, base_url: str, admin_key: str | None) -> None:
    """Managed API keys, each with its own limits; the admin key manages them."""
    ctx.obj = ctx.with_resource(http_client(base_url, admin_key))


@keys.command("create")
@click.argument("name")
@click.option("--rpm", type=int, default=None, help="Requests per minute.")
@click.option("--tpm", type=int, default=None, help="Tokens per minute.")
@click.option("--max-concurrent", type=int, default=None, help="Requests in flight at once.")
@click.option("--monthly-tokens", type=int, default=None, help="Tokens per calendar month (UTC).")
@click.option("--model", "models", multiple=True, help="A model it may call (repeatable; default: all).")
@click.option(
    "--max-priority", type=click.Choice(["low", "normal", "high"]), default=None, help="Its highest class."
)
@click.pass_obj
def create(
    client: httpx.Client,
    name: str,
    rpm: int | None,
    tpm: int | None,
    max_concurrent: int | None,
    monthly_tokens: int | None,
    models: tuple[str, ...],
    max_priority: str | None,
) -> None:
    """Create a key named NAME; prints the key (shown this once) and its id."""
    body: dict[str, Any] = {"name": name, "rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent}
    body["monthly_tokens"] = monthly_tokens
    body["models"] = list(models) or None
    body["max_priority"] = max_priority
    created = _call(client, "POST", "/v1/system/keys", json=body)
    click.echo(created["key"])
    click.echo(f"id {created['id']} (the key is not shown again)", err=True)


@keys.command("list")
@click.pass_obj
def list_keys(client: httpx.Client) -> None:
    """The managed keys: id, name, limits (never the keys)."""
    for k in _call(client, "GET", "/v1/system/keys")["data"]:
        limits = " ".join(f"{name}={k[name]}" for name in _LIMITS if k.get(name) is not None)
        models = f" models={','.join(k['models'])}" if k.get("models") else ""
        click.echo(f"{k['id']}  {k['name']}  {limits or 'unlimited'}{models}")


@keys.command("revoke")
@click.argument("key_id")
@click.pass_obj
def revoke(client: httpx.Client, key_id: str) -> None:
    """Revoke the key KEY_ID: every API process refuses it within a second."""
    _call(client, "DELETE", f"/v1/system/keys/{key_id}")
    click.echo(f"revoked {key_id}")


@click.command()
@click.option("--base-url", envvar="INFERQ_BASE_URL", default=DEFAULT_BASE_URL, show_default=True)
@click.option("--admin-key", envvar="INFERQ_ADMIN_KEY", default=None, help="(INFERQ_ADMIN_KEY)")
@click.option("--start-date", default=None, help="YYYY-MM-DD (UTC); default today.")
@click.option("--end-date", default=None, help="YYYY-MM-DD (UTC); default the start date.")
def usage(base_url: str, admin_key: str | None, start_date: str | None, end_date: str | None) -> None:
    """The usage ledger: per day, key and model, requests, errors and tokens."""
    params = {k: v for k, v in (("start_date", start_date), ("end_date", end_date)) if v}
    with http_client(base_url, admin_key) as client:
        rows = _call(client, "GET", "/v1/system/usage", params=params)["data"]
    columns = ["date", "key_name", "model", "requests", "errors"]
    columns += ["prompt_tokens", "cached_tokens", "completion_tokens"]
    click.echo("\t".join(columns))
    for row in sorted(rows, key=lambda r: (r["date"], r["key_name"], r["model"])):
        click.echo("\t".join(str(row[c]) for c in columns))
