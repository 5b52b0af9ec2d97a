"""Node clients against the fleet, each a script in tests/conformance/node (``make node-deps`` installs
their packages from the committed package-lock.json): the official ``openai`` npm package for chat, streamed
chat, a tool call and a refused key (smoke.mjs) and for the Responses API (responses.mjs), and the Vercel AI
SDK, whose default OpenAI model speaks the Responses API (aisdk.mjs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from typing import Any

import pytest

from tests.conformance.conftest import MODEL, USER_KEY, base_dir
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
NODE_DIR = base_dir() / "node"


def run_script(fleet: Fleet, script: str, *packages: str) -> dict[str, Any]:
    """Run one of the node scripts against the fleet and return the JSON line it prints last."""
    node = shutil.which("node")
    assert node, "node >= 20 is needed for this test"
    for package in packages:
        assert (NODE_DIR / "node_modules" / package).is_dir(), "run `make node-deps` first"
    env = {
        **os.environ,
        "INFERQ_BASE_URL": f"{fleet.base_url}/v1",
        "INFERQ_KEY": USER_KEY,
        "INFERQ_MODEL": MODEL,
    }
    out = subprocess.run(
        [node, script], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr
    seen: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    return seen


def test_openai_npm_package_chat_stream_and_tools(conformance_fleet: Fleet) -> None:
    seen = run_script(conformance_fleet, "smoke.mjs", "openai")
    assert seen["object"] == "chat.completion" and seen["content"]
    assert (
        seen["usage"]["total_tokens"] == seen["usage"]["prompt_tokens"] + seen["usage"]["completion_tokens"]
    )
    assert seen["chunks"] > 2 and seen["streamed"].strip() and seen["finish"] in ("stop", "length")
    call = seen["toolCall"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)
    assert seen["toolFinish"] == "tool_calls"
    assert seen["unauthorized"] == {"status": 401, "code": "invalid_api_key"}


def test_openai_npm_responses(conformance_fleet: Fleet) -> None:
    seen = run_script(conformance_fleet, "responses.mjs", "openai")
    assert seen["object"] == "response" and seen["id"]
    assert seen["status"] in ("completed", "incomplete")
    assert seen["outputText"].strip() and seen["outputTypes"] == ["message"]
    usage = seen["usage"]
    assert usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]

    stream = seen["stream"]
    events = stream["events"]
    assert events[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ], events
    assert events[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ], events
    assert events[-1] in ("response.completed", "response.incomplete"), events
    deltas = events[4:-4]
    assert deltas and set(deltas) == {"response.output_text.delta"}, events
    numbers = stream["sequenceNumbers"]
    assert all(isinstance(n, int) for n in numbers) and numbers == sorted(set(numbers)), numbers
    assert stream["deltas"].strip()
    assert stream["deltas"] == stream["doneText"] == stream["finalText"]
    assert stream["finalObject"] == "response" and stream["finalId"] == stream["createdId"]
    assert stream["finalStatus"] == events[-1].removeprefix("response.")
    final_usage = stream["finalUsage"]
    assert final_usage["total_tokens"] == final_usage["input_tokens"] + final_usage["output_tokens"]


def test_vercel_ai_sdk_generate_stream_and_tool(conformance_fleet: Fleet) -> None:
    seen = run_script(conformance_fleet, "aisdk.mjs", "ai", "@ai-sdk/openai", "zod")
    generated, streamed = seen["generate"], seen["stream"]
    assert generated["text"].strip() and generated["finishReason"] in ("stop", "length")
    assert streamed["text"].strip() and streamed["finishReason"] in ("stop", "length")
    for usage in (generated["usage"], streamed["usage"]):
        assert usage["inputTokens"] > 0 and usage["outputTokens"] > 0
        assert usage["totalTokens"] == usage["inputTokens"] + usage["outputTokens"]
    for called in (seen["tool"], seen["streamTool"]):
        assert len(called["toolCalls"]) == 1, called
        call = called["toolCalls"][0]
        assert call["toolName"] == "get_weather" and not call["invalid"], call
        assert isinstance(call["input"]["city"], str), call
        assert called["finishReason"] == "tool-calls", called
