"""Validation of Responses API payloads against the pinned Open Responses OpenAPI document
(``schemas/openresponses.json``). OpenAPI 3.1 schemas are JSON Schema 2020-12; refs like
``#/components/schemas/X`` resolve against the whole document through a ``referencing`` registry."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SCHEMA_PATH = Path(__file__).parent / "schemas" / "openresponses.json"
_URI = "urn:openresponses:openapi"


@functools.cache
def document() -> dict[str, Any]:
    """The pinned OpenAPI document, loaded once."""
    doc: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return doc


@functools.cache
def _registry() -> Registry[Any]:
    resource: Resource[Any] = DRAFT202012.create_resource(document())
    registry: Registry[Any] = Registry().with_resource(_URI, resource)
    return registry


@functools.cache
def _validator(name: str) -> Draft202012Validator:
    if name not in document()["components"]["schemas"]:
        raise KeyError(f"no schema {name!r} in {SCHEMA_PATH.name}")
    return Draft202012Validator({"$ref": f"{_URI}#/components/schemas/{name}"}, registry=_registry())


@functools.cache
def event_schemas() -> dict[str, str]:
    """Streaming event ``type`` → the name of its schema, from the ``text/event-stream`` response of
    ``POST /responses``."""
    stream = document()["paths"]["/responses"]["post"]["responses"]["200"]["content"]["text/event-stream"]
    schemas = document()["components"]["schemas"]
    by_type: dict[str, str] = {}
    for ref in stream["schema"]["oneOf"]:
        name = ref["$ref"].rsplit("/", 1)[-1]
        for event_type in schemas[name]["properties"]["type"]["enum"]:
            by_type[event_type] = name
    return by_type


def _explain(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    # A oneOf over items or parts says only "not valid under any of the given schemas"; the branch meant is
    # the one whose `type` property matched, so report that branch's error instead.
    while error.context:
        branches: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        meant = [errs for errs in branches.values() if not any(list(e.path) == ["type"] for e in errs)]
        if len(meant) != 1:
            break
        error = best_match(meant[0]) or error
    return error


def validate(name: str, obj: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``obj`` matches ``components.schemas[name]``."""
    error = best_match(_validator(name).iter_errors(obj))
    if error is not None:
        error = _explain(error)
        raise jsonschema.ValidationError(f"not a valid {name}: at {error.json_path}: {error.message}")


def validate_response(obj: dict[str, Any]) -> None:
    validate("ResponseResource", obj)


def validate_event(event: dict[str, Any]) -> None:
    schema = event_schemas().get(event.get("type", ""))
    if schema is None:
        raise AssertionError(f"unknown streaming event type {event.get('type')!r}")
    validate(schema, event)


def validate_compact(obj: dict[str, Any]) -> None:
    validate("CompactResource", obj)


def validate_ws_error(obj: dict[str, Any]) -> None:
    validate("WebSocketErrorEvent", obj)
