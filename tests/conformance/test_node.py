"""The official ``openai`` npm package, run by Node, against the fleet: chat, streamed chat, a tool call and
a refused key (tests/conformance/node/smoke.mjs; ``make node-deps`` installs the package)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conformance.conftest import MODEL, USER_KEY, base_dir
from tests.fleet import Fleet

pytestmark = pytest.mark.e2e
NODE_DIR = base_dir() / "node"


def test_openai_npm_package_chat_stream_and_tools(conformance_fleet: Fleet) -> None:
    node = shutil.which("node")
    assert node, "node >= 20 is needed for this test"
    assert (NODE_DIR / "node_modules" / "openai").is_dir(), "run `make node-deps` first"
    env = {
        **os.environ,
        "INFERQ_BASE_URL": f"{conformance_fleet.base_url}/v1",
        "INFERQ_KEY": USER_KEY,
        "INFERQ_MODEL": MODEL,
    }
    out = subprocess.run(
        [node, "smoke.mjs"], cwd=NODE_DIR, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout.strip().splitlines()[-1])
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
