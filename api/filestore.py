"""Where file bytes live: a small interface so that an object store can replace the local disk later.

The methods are synchronous (plain file I/O); async callers run them with ``asyncio.to_thread``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

_CHUNK = 1024 * 1024
# Ids become file names: anything else (a separator, "..", a leading dot) is refused before touching the disk.
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class FileTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"file is larger than {limit} bytes")
        self.limit = limit


class FileStore(Protocol):
    def save(self, file_id: str, source: BinaryIO, max_bytes: int) -> int:
        """Copies ``source`` under ``file_id`` and returns its size; raises FileTooLarge, leaving nothing
        behind, once more than ``max_bytes`` were read. Readers never see a partly written file."""
        ...

    def open(self, file_id: str) -> BinaryIO:
        """The stored bytes, for reading; FileNotFoundError when there are none."""
        ...

    def delete(self, file_id: str) -> None:
        """Removes the bytes; no error when there are none."""
        ...


class LocalFileStore:
    """One file per id in a directory, created on first use."""

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser()

    def _path(self, file_id: str) -> Path:
        if not _SAFE_ID.fullmatch(file_id):
            raise ValueError(f"not a valid file id: {file_id!r}")
        return self.root / file_id

    def save(self, file_id: str, source: BinaryIO, max_bytes: int) -> int:
        target = self._path(file_id)
        self.root.mkdir(parents=True, exist_ok=True)
        # A dot-name in the same directory, so the final rename is atomic and never matches an id.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{file_id}.", suffix=".part")
        try:
            size = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(_CHUNK):
                    size += len(chunk)
                    if size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return size

    def open(self, file_id: str) -> BinaryIO:
        try:
            path = self._path(file_id)
        except ValueError as exc:
            raise FileNotFoundError(file_id) from exc
        return path.open("rb")

    def delete(self, file_id: str) -> None:
        self._path(file_id).unlink(missing_ok=True)
