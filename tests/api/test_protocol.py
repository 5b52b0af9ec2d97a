"""Protocol models: unknown fields are accepted and logged once per model and name."""

from __future__ import annotations

import logging

import pytest

from api.protocol.chat import ChatCompletionRequest
from api.protocol.completions import CompletionRequest
from api.protocol.embeddings import EmbeddingRequest


def test_unknown_fields_are_kept_and_logged_once_per_name(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="api.protocol.base")
    body = {"model": "m", "messages": [{"role": "user", "content": "x", "mood": "calm"}], "zz_new_field": 1}
    for _ in range(3):
        req = ChatCompletionRequest.model_validate(body)
        assert req.model_extra == {"zz_new_field": 1}
    CompletionRequest.model_validate({"model": "m", "prompt": "x", "zz_new_field": 2})
    EmbeddingRequest.model_validate({"model": "m", "input": "x", "zz_new_field": 3})
    logged = [r.getMessage() for r in caplog.records]
    assert logged.count("ChatCompletionRequest: ignoring unknown field 'zz_new_field'") == 1
    assert logged.count("ChatMessageParam: ignoring unknown field 'mood'") == 1
    assert logged.count("CompletionRequest: ignoring unknown field 'zz_new_field'") == 1
    assert logged.count("EmbeddingRequest: ignoring unknown field 'zz_new_field'") == 1


def test_embedding_inputs_normalise_to_a_list() -> None:
    def inputs(value: object) -> object:
        return EmbeddingRequest.model_validate({"model": "m", "input": value}).inputs()

    assert inputs("a") == ["a"]
    assert inputs(["a", "b"]) == ["a", "b"]
    assert inputs([1, 2]) == [[1, 2]]
    assert inputs([[1], [2, 3]]) == [[1], [2, 3]]
