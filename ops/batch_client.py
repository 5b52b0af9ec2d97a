"""The HTTP side of `inferq batch`: turning a JSONL file into batch request lines, and a small client of the
OpenAI-shaped Files and Batches routes. It imports nothing of the server, so it works against any inferq (or
OpenAI) server.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

Batch = dict[str, Any]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
DEFAULT_ENDPOINT = ENDPOINTS[0]
DEFAULT_BASE_URL = "http://127.0.0.1:8000"
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
POLL_S = 0.5
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
