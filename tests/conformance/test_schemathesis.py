"""Schemathesis over the API's own OpenAPI schema, against the real fleet (API, Redis, worker, model): valid
and invalid inputs for every operation, a bounded number each; no input may get a 5xx.

Valid inputs name real things: the served model, and a file, a batch and a stored response created through the
API before the first operation, so a path parameter reaches an object instead of a 404. The hypothesis seed
changes from run to run (``INFERQ_SCHEMATHESIS_SEED`` repeats one; the session header and every failure say
which). Operations that have nothing to make invalid are listed in ``NOTHING_TO_INVALIDATE``; any other
operation for which no invalid input can be generated fails.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
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
# A valid request whose only inputs are the ids filled in below is the same request every time.
EXAMPLES_IDS_ONLY = 2
GENERATING = {
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/responses",
    "POST /v1/responses/compact",
    "POST /v1/messages",
    "POST /v1/messages/count_tokens",
}
# No parameters, or only path parameters of type string (any string is a valid id): schemathesis has nothing
# to break, and raises Unsatisfiable. Checked by test_these_operations_have_nothing_to_make_invalid.
NOTHING_TO_INVALIDATE = {
    "DELETE /v1/files/{file_id}",
    "DELETE /v1/responses/{response_id}",
    "GET /v1/batches/{batch_id}",
    "GET /v1/files/{file_id}",
    "GET /v1/files/{file_id}/content",
    "GET /v1/models",
    "GET /v1/models/{model_id}",
    "GET /v1/system/health",
    "GET /v1/system/models",
    "GET /v1/system/queues",
    "GET /v1/system/keys",
    "DELETE /v1/system/keys/{key_id}",
    "POST /v1/batches/{batch_id}/cancel",
    "POST /v1/responses/{response_id}/cancel",
}
# Fields that make a valid Responses request refer to state the fleet lacks (a stored response, a
# conversation, a prompt template) or run past the test (background): left out, so requests reach the model.
_RESPONSES_STATEFUL = ("previous_response_id", "conversation", "prompt", "background")
SEED_ENV = "INFERQ_SCHEMATHESIS_SEED"  # set by tests/conftest.py when not given, so the header can print it

# The schema the fleet's API serves, built in-process at collection (building it needs no Redis), so each
# operation is its own test. schemathesis's own pytest plugin does not run on this pytest.
SCHEMA = schemathesis.openapi.from_dict(create_app(Settings(), Catalog.load(DEFAULT_CATALOG)).openapi())
OPERATIONS = {op.label: op for op in (result.ok() for result in SCHEMA.get_all_operations())}  # type: ignore[union-attr]
POSITIVE, NEGATIVE = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE


def _seed() -> int:
    return int(os.environ.get(SEED_ENV) or 0)


def _reproduce() -> str:
    return f"(reproduce with {SEED_ENV}={_seed()})"


@dataclass
class Real:
    """Objects that exist on the fleet, for valid requests to name."""

    http: httpx.Client
    file_id: str  # purpose batch, one chat line for the served model
    batch_id: str
    response_id: str  # stored, background, completed

    def upload(self, purpose: str = "batch") -> str:
        line = {
            "custom_id": "line-1",
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
        }
        files = {"file": ("input.jsonl", json.dumps(line).encode() + b"\n")}
        done = self.http.post("/v1/files", files=files, data={"purpose": purpose})
        assert done.status_code == 200, done.text
        return str(done.json()["id"])

    def batch(self) -> str:
        body = {"input_file_id": self.file_id, "endpoint": "/v1/chat/completions", "completion_window": "24h"}
        done = self.http.post("/v1/batches", json=body)
        assert done.status_code == 200, done.text
        return str(done.json()["id"])

    def respond(self, background: bool = False) -> str:
        body = {
            "model": MODEL,
            "input": "Hi",
            "max_output_tokens": 2,
            "store": True,
            "background": background,
        }
        done = self.http.post("/v1/responses", json=body)
        assert done.status_code == 200, done.text
        return str(done.json()["id"])


@pytest.fixture(scope="module")
def real(conformance_fleet: Fleet) -> Iterator[Real]:
    with httpx.Client(base_url=conformance_fleet.base_url, headers=AUTH, timeout=120) as http:
        made = Real(http, "", "", "")
        made.file_id = made.upload()
        made.batch_id = made.batch()
        made.response_id = made.respond(background=True)
        deadline = time.monotonic() + 60
        while http.get(f"/v1/responses/{made.response_id}").json()["status"] in ("queued", "in_progress"):
            assert time.monotonic() < deadline, "the background response never ended"
            time.sleep(0.1)
        yield made


# Not the management routes' {model}: loading the served model on the fleet's only worker, which has it
# loaded, answers 503 model_not_loaded ("no live worker can load it"), an open finding of issue 12.
REAL_PARAMETERS = ("file_id", "batch_id", "response_id", "model_id")


def _ids(label: str, real: Real) -> dict[str, Callable[[], str]]:
    """Path parameter -> its real value. A delete or a batch cancel gets an object of its own each time (the
    fixture's one-line batch is soon done, and a finished batch cannot be cancelled)."""
    if label == "DELETE /v1/files/{file_id}":
        return {"file_id": lambda: real.upload("user_data")}
    if label == "POST /v1/batches/{batch_id}/cancel":
        return {"batch_id": real.batch}
    if label == "DELETE /v1/responses/{response_id}":
        return {"response_id": real.respond}
    return {
        "file_id": lambda: real.file_id,
        "batch_id": lambda: real.batch_id,
        "response_id": lambda: real.response_id,
        "model_id": lambda: MODEL,
    }


def _name_real_objects(case: schemathesis.Case, label: str, real: Real) -> None:  # type: ignore[type-arg]
    for name, value in _ids(label, real).items():
        if case.path_parameters and name in case.path_parameters:
            case.path_parameters[name] = value()
    # A page that starts after a real object.
    if case.query and "after" in case.query:
        after = {"GET /v1/files": real.file_id, "GET /v1/batches": real.batch_id}.get(label)
        if after is not None:
            case.query["after"] = after
    body = case.body
    if label == "POST /v1/batches" and isinstance(body, dict):
        body["input_file_id"] = real.file_id
        body["endpoint"] = "/v1/chat/completions"  # the file's lines are chat requests
        if not re.fullmatch(r"[1-9][0-9]*[smhd]", str(body.get("completion_window", "24h"))):
            body["completion_window"] = "24h"


def _reach_the_worker(label: str, body: Any) -> None:
    """Point a valid generated request at the served model, so it runs on the worker rather than ending in
    a 404; cap its size (tokens, choices, prompts) so that a run stays within seconds."""
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return
    body["model"] = MODEL
    # An integer in the schema may be generated as 2092324.0, and null means "up to the context": either one
    # can run a minute on a loaded core.
    for field in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        if _number(body.get(field)):
            body[field] = min(int(body[field]), 8)
        elif field in body and body[field] is None:
            body[field] = 8
    if label in ("POST /v1/responses", "POST /v1/responses/compact"):
        for field in _RESPONSES_STATEFUL:
            body.pop(field, None)
        body.setdefault("max_output_tokens", 8)
        if not body.get("input"):
            body["input"] = "Hi"  # an empty input is refused (400), a missing one needs a previous response
    if "messages" in body or "prompt" in body:
        body.setdefault("max_tokens", 8)
    if _number(body.get("n")):
        body["n"] = 1
    for field in ("prompt", "input", "messages"):
        if isinstance(body.get(field), list):
            body[field] = [_short(item) for item in body[field][:2]]
        elif field in body:
            body[field] = _short(body[field])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _short(value: Any) -> Any:
    """Long texts cost prefill time on one shared core and test nothing more than short ones."""
    if isinstance(value, str):
        return value[:40]
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return {**value, "content": value["content"][:40]}
    return value


def _names_an_object(label: str) -> bool:
    return any(p.name in REAL_PARAMETERS for p in OPERATIONS[label].path_parameters)


def _ids_only(label: str) -> bool:
    """Whether the operation takes nothing but path parameters (filled in with real values)."""
    op = OPERATIONS[label]
    others = len(op.query) + len(op.headers) + len(op.cookies) + len(op.body)
    return len(op.path_parameters) > 0 and others == 0


def _settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )


CASES = [(label, POSITIVE) for label in sorted(OPERATIONS)] + [
    (label, NEGATIVE) for label in sorted(OPERATIONS) if label not in NOTHING_TO_INVALIDATE
]


@pytest.mark.parametrize(("label", "mode"), CASES, ids=[f"{label}-{mode.value}" for label, mode in CASES])
def test_no_input_gets_a_server_error(
    conformance_fleet: Fleet, real: Real, label: str, mode: schemathesis.GenerationMode
) -> None:
    failures: list[tuple[str, int, str]] = []
    on_the_model = mode == POSITIVE and label in GENERATING
    statuses: list[int] = []
    examples = EXAMPLES_ON_THE_MODEL if on_the_model else EXAMPLES
    if mode == POSITIVE and _ids_only(label):
        examples = EXAMPLES_IDS_ONLY

    @given(case=OPERATIONS[label].as_strategy(generation_mode=mode))
    @_settings(examples)
    @seed(_seed())
    def call(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
        if mode == POSITIVE:
            _name_real_objects(case, label, real)
            _reach_the_worker(label, case.body)
        response = case.call(base_url=conformance_fleet.base_url, headers=AUTH, timeout=120)
        statuses.append(response.status_code)
        if response.status_code >= 500:
            sent = f"path={case.path_parameters} query={case.query} body={case.body!r:.300}"
            failures.append((sent, response.status_code, response.text[:300]))

    try:
        call()
    except Unsatisfiable:
        pytest.fail(
            f"no invalid input found for {label}; if it has none, list it in NOTHING_TO_INVALIDATE",
            pytrace=False,
        )
    assert failures == [], _reproduce()
    if on_the_model:
        assert 200 in statuses, f"no generated request reached the worker {_reproduce()}"
    if mode == POSITIVE and _names_an_object(label):
        assert any(s < 300 for s in statuses), f"no request naming a real object succeeded: {statuses}"


@pytest.mark.parametrize("label", sorted(NOTHING_TO_INVALIDATE))
def test_these_operations_have_nothing_to_make_invalid(label: str) -> None:
    @given(case=OPERATIONS[label].as_strategy(generation_mode=NEGATIVE))
    @_settings(EXAMPLES)
    @seed(_seed())
    def generate(case: schemathesis.Case) -> None:  # type: ignore[type-arg]
        pass

    with pytest.raises(Unsatisfiable):
        generate()
