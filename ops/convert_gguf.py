"""Convert a GGUF checkpoint into a plain Hugging Face folder (config.json, model.safetensors, tokenizer
files, chat_template.jinja) with transformers' GGUF loader. Run as a script by ``inferq models prepare``
under an interpreter that has torch, transformers >= 5, gguf and accelerate (an engine venv);
../shared/recipes has the measured original.

usage: python -m ops.convert_gguf GGUF_FILE OUT_DIR [float32|bfloat16|float16]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _gguf_flag(reader: Any, key: str) -> bool | None:
    f = reader.fields.get(key)
    return None if f is None else bool(f.parts[f.data[0]][0])


def convert(gguf: Path, out: Path, dtype_name: str = "float32") -> None:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf.parent), gguf.name
    # transformers' GGUF tokenizer conversion drops these flags (Gemma 3 needs add_bos_token).
    reader = GGUFReader(str(gguf))
    flags = {k: _gguf_flag(reader, f"tokenizer.ggml.{k}") for k in ("add_bos_token", "add_eos_token")}
    del reader
    tok = AutoTokenizer.from_pretrained(src, gguf_file=name)
    for key, value in flags.items():
        if value is not None and getattr(tok, key, None) != value:
            setattr(tok, key, value)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=getattr(torch, dtype_name))
    # transformers tags a GGUF-loaded model as quantized ("not serializable") although every weight was
    # dequantized into dense tensors: drop the quantizer so save_pretrained writes a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tok.save_pretrained(out)


if __name__ == "__main__":
    convert(Path(sys.argv[1]), Path(sys.argv[2]), *(sys.argv[3:4] or ["float32"]))
