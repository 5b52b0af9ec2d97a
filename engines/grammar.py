"""JSON schemas as llama.cpp grammars (GBNF), for output that must parse and validate.

Converting a schema costs milliseconds and the same schema comes back with every request of a client's tool
loop, so grammars are cached by the schema's JSON text.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

import llama_cpp
from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

from engines.base import UnsupportedRequest


@lru_cache(maxsize=256)
def _gbnf(schema_json: str) -> str:
    try:
        gbnf: str = json_schema_to_gbnf(schema_json)
    except Exception as exc:
        # The schema comes from the client, and the converter signals what it cannot express with assertions,
        # failed lookups and the like: any failure here is the request's, answered as a 400.
        raise UnsupportedRequest(
            f"The JSON schema cannot be turned into a grammar: {exc or type(exc).__name__}", "response_format"
        ) from exc
    return gbnf


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to others. Documents valid for the closed
    schema are valid for the original; a small model let loose on optional extra keys may never stop adding
    them and run out of tokens mid-document."""
    if isinstance(schema, list):
        return [_closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) for k, v in schema.items()}
    if "properties" in out and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def grammar_for(schema: dict[str, Any], vocab: Any) -> LlamaGrammar:
    """A grammar accepting only JSON documents valid for ``schema`` (``{}``: any JSON object), checked
    against the model's vocabulary (``llama_vocab*``)."""
    # Key order is kept: the grammar writes properties in the order the schema lists them.
    try:
        closed = json.dumps(_closed(schema))
    except RecursionError:
        # The API refuses bodies this deep; a job from elsewhere still gets a 400, not a crashed worker.
        raise UnsupportedRequest("The JSON schema nests too deeply.", "response_format") from None
    gbnf = _gbnf(closed)
    grammar = LlamaGrammar.from_string(gbnf, verbose=False)
    # llama.cpp's own parser has the last word; a grammar it rejects would reach the sampler chain as NULL.
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, gbnf.encode(), grammar._root.encode())
    if not sampler:
        raise UnsupportedRequest("llama.cpp cannot parse the grammar of this JSON schema.", "response_format")
    llama_cpp.llama_sampler_free(sampler)
    return grammar
