"""The Files API against a real Redis and directory, over HTTP and through the openai SDK."""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import redis
from fastapi.testclient import TestClient

from api.app import create_app
from api.files import Files
from api.filestore import FileTooLarge, LocalFileStore
from ops.redis_server import RedisServer
from queueing import keys
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

LIMIT = 4096
LINES = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


@pytest.fixture
def files_dir(tmp_path: Path) -> Path:
    return tmp_path / "files"  # not there yet: the store creates it


@pytest.fixture
def http(redis_server: RedisServer, redis_client: redis.Redis, files_dir: Path) -> Iterator[TestClient]:
    settings = Settings(redis_url=redis_server.url, files_dir=files_dir, file_max_bytes=LIMIT)
    with TestClient(create_app(settings, Catalog.load(DEFAULT_CATALOG))) as c:
        yield c


def error(resp: object) -> dict[str, object]:
    body = resp.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return dict(body["error"])


def upload(http: TestClient, data: bytes = LINES, purpose: str = "batch", name: str = "in.jsonl") -> str:
    r = http.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})
    assert r.status_code == 200, r.text
    return str(r.json()["id"])


def stored(files_dir: Path) -> list[str]:
    """Everything on disk, temporary files included."""
    return sorted(p.name for p in files_dir.iterdir()) if files_dir.exists() else []


def test_upload_retrieve_content_delete(http: TestClient, redis_client: redis.Redis, files_dir: Path) -> None:
    r = http.post("/v1/files", files={"file": ("in.jsonl", LINES)}, data={"purpose": "batch"})
    assert r.status_code == 200, r.text
    obj = r.json()
    file_id = obj["id"]
    assert re.fullmatch(r"file-[0-9a-f]{24}", file_id)
    assert obj == {
        "id": file_id,
        "object": "file",
        "bytes": len(LINES),
        "created_at": obj["created_at"],
        "filename": "in.jsonl",
        "purpose": "batch",
        "status": "processed",
        "status_details": None,
        "expires_at": None,
    }
    assert abs(obj["created_at"] - time.time()) < 10
    assert http.get(f"/v1/files/{file_id}").json() == obj
    content = http.get(f"/v1/files/{file_id}/content")
    assert content.status_code == 200
    assert content.content == LINES
    assert content.headers["content-type"] == "application/octet-stream"
    assert stored(files_dir) == [file_id]
    assert redis_client.zscore(keys.FILES_INDEX, file_id) is not None

    deleted = http.delete(f"/v1/files/{file_id}")
    assert deleted.json() == {"id": file_id, "object": "file", "deleted": True}
    assert stored(files_dir) == []
    assert redis_client.exists(keys.file_key(file_id)) == 0
    assert redis_client.zcard(keys.FILES_INDEX) == 0
    for resp in (
        http.get(f"/v1/files/{file_id}"),
        http.get(f"/v1/files/{file_id}/content"),
        http.delete(f"/v1/files/{file_id}"),
    ):
        assert resp.status_code == 404 and error(resp)["code"] == "file_not_found"


def test_unknown_id_is_openai_404(http: TestClient) -> None:
    for file_id in ("file-0123456789abcdef01234567", "not-an-id"):
        r = http.get(f"/v1/files/{file_id}")
        assert r.status_code == 404
        assert error(r) == {
            "message": f"No such File object: {file_id}",
            "type": "invalid_request_error",
            "param": "file_id",
            "code": "file_not_found",
        }


def test_list_orders_pages_and_filters(http: TestClient) -> None:
    purposes = ["batch", "user_data", "batch", "user_data", "batch"]
    ids = [upload(http, f"{i}\n".encode(), p) for i, p in enumerate(purposes)]
    assert len(set(ids)) == 5

    everything = http.get("/v1/files").json()
    assert everything["object"] == "list"
    assert [f["id"] for f in everything["data"]] == ids[::-1]
    assert everything["has_more"] is False
    assert (everything["first_id"], everything["last_id"]) == (ids[-1], ids[0])
    assert [f["id"] for f in http.get("/v1/files?order=asc").json()["data"]] == ids

    pages, after = [], None
    while True:
        page = http.get("/v1/files", params={"limit": 2, **({"after": after} if after else {})}).json()
        pages.append(([f["id"] for f in page["data"]], page["has_more"]))
        if not page["has_more"]:
            break
        after = page["last_id"]
    assert pages == [(ids[4:2:-1], True), (ids[2:0:-1], True), ([ids[0]], False)]

    asc = http.get("/v1/files", params={"order": "asc", "limit": 2, "after": ids[1]}).json()
    assert [f["id"] for f in asc["data"]] == ids[2:4] and asc["has_more"] is True

    batch = http.get("/v1/files", params={"purpose": "batch"}).json()
    assert [f["id"] for f in batch["data"]] == [ids[4], ids[2], ids[0]]
    one = http.get("/v1/files", params={"purpose": "user_data", "limit": 1, "after": ids[3]}).json()
    assert [f["id"] for f in one["data"]] == [ids[1]] and one["has_more"] is False
    assert http.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"] == []

    # A cursor whose file was deleted in the meantime still continues where it was.
    http.delete(f"/v1/files/{ids[3]}")
    rest = http.get("/v1/files", params={"limit": 2, "after": ids[3]}).json()
    assert [f["id"] for f in rest["data"]] == [ids[2], ids[1]]


@pytest.mark.parametrize(
    ("params", "param"), [({"limit": 0}, "limit"), ({"order": "up"}, "order"), ({"after": "x"}, "after")]
)
def test_list_rejects_bad_query(http: TestClient, params: dict[str, str | int], param: str) -> None:
    r = http.get("/v1/files", params=params)
    assert r.status_code == 400 and error(r)["param"] == param


def test_openai_sdk(http: TestClient, files_dir: Path) -> None:
    client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)
    created = client.files.create(file=("in.jsonl", LINES), purpose="batch")
    assert created.filename == "in.jsonl" and created.bytes == len(LINES) and created.purpose == "batch"
    assert created.status == "processed"
    assert client.files.retrieve(created.id) == created
    other = client.files.create(file=("notes.txt", b"hello"), purpose="user_data")

    assert [f.id for f in client.files.list().data] == [other.id, created.id]
    assert [f.id for f in client.files.list(purpose="batch")] == [created.id]
    # The SDK follows `after` itself across pages of one.
    assert [f.id for f in client.files.list(limit=1, order="asc")] == [created.id, other.id]
    assert client.files.content(created.id).content == LINES

    gone = client.files.delete(created.id)
    assert gone.id == created.id and gone.deleted is True
    with pytest.raises(openai.NotFoundError) as exc:
        client.files.retrieve(created.id)
    assert exc.value.code == "file_not_found"
    assert stored(files_dir) == [other.id]


def test_size_limit(http: TestClient, redis_client: redis.Redis, files_dir: Path) -> None:
    exact = upload(http, b"x" * LIMIT)
    assert http.get(f"/v1/files/{exact}").json()["bytes"] == LIMIT

    for size in (LIMIT + 1, 100 * LIMIT):  # caught while copying the file / by the Content-Length
        r = http.post("/v1/files", files={"file": ("big.jsonl", b"x" * size)}, data={"purpose": "batch"})
        assert r.status_code == 413
        err = error(r)
        assert err["type"] == "invalid_request_error" and err["code"] == "file_too_large"
        assert str(LIMIT) in str(err["message"])
    assert stored(files_dir) == [exact]
    assert redis_client.zrange(keys.FILES_INDEX, 0, -1) == [exact.encode()]


def test_oversized_bodies_are_refused_before_the_form_is_parsed(
    http: TestClient, files_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def never(*_: object) -> None:
        raise AssertionError("the route ran: the whole body was spooled first")

    monkeypatch.setattr(Files, "create", never)
    boundary = "inferqboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jsonl"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    data = b"x" * (100 * LIMIT)
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}

    def chunked() -> Iterator[bytes]:  # a generator body is sent without a Content-Length
        yield from (head, data, tail)

    for content in (head + data + tail, chunked()):
        r = http.post("/v1/files", content=content, headers=headers)
        assert r.status_code == 413 and error(r)["code"] == "file_too_large"
    assert stored(files_dir) == []


def test_purpose_and_fields_are_checked(http: TestClient, files_dir: Path) -> None:
    r = http.post("/v1/files", files={"file": ("a.jsonl", LINES)}, data={"purpose": "fine-tune"})
    assert r.status_code == 400
    err = error(r)
    assert err["type"] == "invalid_request_error" and err["param"] == "purpose"
    assert "batch" in str(err["message"]) and "user_data" in str(err["message"])

    r = http.post("/v1/files", files={"file": ("a.jsonl", LINES)})
    assert r.status_code == 400 and error(r)["param"] == "purpose"
    r = http.post("/v1/files", data={"purpose": "batch"}, files={"other": ("a.jsonl", LINES)})
    assert r.status_code == 400 and error(r)["param"] == "file"
    assert stored(files_dir) == []


def test_system_files_skip_the_upload_limit(http: TestClient) -> None:
    files = http.app.state.files  # type: ignore[attr-defined]
    assert isinstance(files, Files)
    data = b"y" * (3 * LIMIT)
    assert http.portal is not None
    made = http.portal.call(files.create_bytes, "batch_out.jsonl", "batch_output", data)
    assert made.purpose == "batch_output" and made.bytes == len(data)
    assert http.portal.call(files.read, made.id) == data
    assert http.get(f"/v1/files/{made.id}/content").content == data
    assert [f["id"] for f in http.get("/v1/files?purpose=batch_output").json()["data"]] == [made.id]


def test_local_store(tmp_path: Path) -> None:
    store = LocalFileStore(tmp_path / "a" / "b")
    assert store.save("f1", io.BytesIO(b"abc"), 3) == 3
    with store.open("f1") as fh:
        assert fh.read() == b"abc"
    with pytest.raises(FileTooLarge) as exc:
        store.save("f2", io.BytesIO(b"abcd"), 3)
    assert exc.value.limit == 3
    assert sorted(p.name for p in (tmp_path / "a" / "b").iterdir()) == ["f1"]
    store.delete("f1")
    store.delete("f1")
    with pytest.raises(FileNotFoundError):
        store.open("f1")
    with pytest.raises(ValueError):
        store.save("../escape", io.BytesIO(b""), 3)
