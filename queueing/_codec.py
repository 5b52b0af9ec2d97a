"""Redis replies arrive as bytes (no decode_responses); redis-py types them as bytes or str."""

from __future__ import annotations


def text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
