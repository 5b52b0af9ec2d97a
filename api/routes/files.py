"""The Files API: ``/v1/files`` upload, list, retrieve, content and delete (logic in api/files.py)."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Annotated, Any, BinaryIO, Literal, cast

from fastapi import APIRouter, File, Form, Query, Request, Response, UploadFile
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message, Receive

from api import errors
from api.deps import FilesDep, OwnerDep
from api.files import Files
from api.protocol.files import FileDeleted, FileList, FileObject

router = APIRouter()

_CHUNK = 1024 * 1024
# Room for the multipart framing and the small form fields around the file itself.
_FORM_OVERHEAD = 64 * 1024


class _CappedBody:
    """A receive channel that stops a request body once it is too long for a file of ``limit`` bytes."""

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self.limit = limit
        self.received = 0
        self.exceeded = False

    async def __call__(self) -> Message:
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit + _FORM_OVERHEAD:
                self.exceeded = True
                raise errors.file_too_large(self.limit)
        return message


class _UploadRoute(APIRoute):
    """Turns an oversized upload away before FastAPI spools all of it to disk: by its Content-Length, or, for
    a body without one, as soon as it has run past the limit. The exact limit is checked on the file itself
    (FileStore.save)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def capped(request: Request) -> Response:
            limit = cast(Files, request.app.state.files).max_bytes
            length = request.headers.get("content-length", "")
            if length.isdigit() and int(length) > limit + _FORM_OVERHEAD:
                raise errors.file_too_large(limit)
            body = _CappedBody(request.receive, limit)
            try:
                return await handler(Request(request.scope, body))
            except HTTPException:
                # FastAPI reports any failure while parsing the form as a 400.
                if body.exceeded:
                    raise errors.file_too_large(limit) from None
                raise

        return capped


async def upload(
    files: FilesDep,
    owner: OwnerDep,
    file: Annotated[UploadFile, File(description="The file; for purpose batch, JSONL request lines.")],
    purpose: Annotated[Literal["batch", "user_data"], Form(description="What the file is for.")],
) -> FileObject:
    return await files.create(file.filename or "upload", purpose, file.file, owner)


router.add_api_route(
    "/v1/files", upload, methods=["POST"], response_model=FileObject, route_class_override=_UploadRoute
)


@router.get("/v1/files", response_model=FileList)
async def list_files(
    files: FilesDep,
    owner: OwnerDep,
    purpose: str | None = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    order: Literal["asc", "desc"] = "desc",
    after: Annotated[str | None, Query(description="Id of the last file of the previous page.")] = None,
) -> FileList:
    return await files.list(purpose, limit, after, order, owner)


@router.get("/v1/files/{file_id}", response_model=FileObject)
async def retrieve_file(file_id: str, files: FilesDep, owner: OwnerDep) -> FileObject:
    return await files.get(file_id, owner)


def _chunks(handle: BinaryIO) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(_CHUNK):
            yield chunk


@router.get(
    "/v1/files/{file_id}/content",
    response_class=Response,
    responses={200: {"content": {"application/octet-stream": {}}}},
)
async def file_content(file_id: str, files: FilesDep, owner: OwnerDep) -> StreamingResponse:
    file = await files.get(file_id, owner)
    handle = await files.open(file_id, owner)
    # A sync iterator: Starlette reads it in a worker thread, so the event loop never waits on the disk.
    return StreamingResponse(
        _chunks(handle),
        media_type="application/octet-stream",
        headers={"content-length": str(file.bytes)},
    )


@router.delete("/v1/files/{file_id}", response_model=FileDeleted)
async def delete_file(file_id: str, files: FilesDep, owner: OwnerDep) -> FileDeleted:
    return await files.delete(file_id, owner)
