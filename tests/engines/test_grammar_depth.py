"""A JSON schema past Python's recursion limit is the request's fault (a 400 from the worker), not a crash:
the API refuses such bodies, but a job may come from elsewhere."""

from __future__ import annotations

from typing import Any

import pytest

from engines.base import UnsupportedRequest
from engines.grammar import grammar_for


def test_a_schema_nested_past_the_recursion_limit_is_unsupported() -> None:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "object", "properties": {"a": schema}}
    with pytest.raises(UnsupportedRequest) as caught:
        grammar_for(schema, None)  # refused before the vocabulary is needed
    assert "nests too deeply" in str(caught.value)
