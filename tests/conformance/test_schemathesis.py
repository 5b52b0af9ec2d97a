"""Schemathesis over the API's own OpenAPI schema, against the real fleet (API, Redis, worker, model): valid
and invalid inputs for every operation, a bounded number each; no input may get a 5xx."""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable

from api.app import create_app
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings
from tests.conformance.conftest import ADMIN_KEY, MODEL
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e

# The admin key is also a normal key: every operation, management writes included, is reached.
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
EXAMPLES = 10
# Valid generation requests run on the model (one shared core in CI), so they get fewer examples.
EXAMPLES_ON_THE_MODEL = 6
GENERATING = {
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "POST /v1/responses/compact",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
}
# Fields that make a valid Responses request refer to state the fleet lacks (a stored response, a
# conversation, a prompt template) or run past the test (background): left out, so requests reach the model.
_RESPONSES_STATEFUL = ("previous_response_id", "conversation", "prompt", "background")

# The schema the fleet's API serves, built in-process at collection (building it needs no Redis), so each
# operation is its own test. schemathesis's own pytest plugin does not run on this pytest.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(), Catalog.load(DEFAULT_CATALOG)).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}  # type: ignore[union-attr]


def _reach_the_worker(body: Any) -> None:
    """Point a valid generated request at the served model, so it runs on the worker rather than ending in
    a 404; cap its size (tokens, choices, prompts) so that a run stays within seconds."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return
    body["model"] = MODEL
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if isinstance(body.get(field), int):
            body[field] = min(body[field], 8)
    if "input" in body and "encoding_format" not in body:
        for field in _RESPONSES_STATEFUL:
            body.pop(field, None)
        body.setdefault("max_output_tokens", 8)
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", 8)
    if isinstance(body.get("n"), int):
        body["n"] = 1
    for field in ("prompt", "input", "messages"):
        if isinstance(body.get(field), list):
            body[field] = [_short(item) for item in body[field][:2]]
        elif field in body:
            body[field] = _short(body[field])


def _short(value: Any) -> Any:
    """Long texts cost prefill time on one shared core and test nothing more than short ones."""
    if isinstance(value, str):
        return value[:40]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {**value, "content": value["content"][:40]}
    return value


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
@pytest.mark.parametrize("label", sorted(OPERATIONS))
def test_no_input_gets_a_server_error(
    conformance_fleet: Fleet, label: str, mode: schemathesis.GenerationMode
) -> None:
    failures: list[tuple[Any, int, str]] = []
    on_the_model = mode == schemathesis.GenerationMode.POSITIVE and label in GENERATING
    statuses: list[int] = []

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_ON_THE_MODEL if on_the_model else EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def call(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
        if mode == schemathesis.GenerationMode.POSITIVE:
            _reach_the_worker(case.body)
        response = case.call(base_url=conformance_fleet.base_url, headers=AUTH, timeout=120)
        statuses.append(response.status_code)
        if response.status_code >= 500:
            failures.append((case.body, response.status_code, response.text[:300]))

    try:
        call()
    except Unsatisfiable:
        pytest.skip(f"{label} has no input that could be made invalid")
    assert failures == []
    if on_the_model:
        assert 200 in statuses, "no generated request reached the worker"
