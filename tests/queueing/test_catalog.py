from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from queueing.catalog import DEFAULT_CATALOG, Catalog, ModelSource


def test_builtin_catalog_serves_smollm2_from_its_package() -> None:
    spec = Catalog.load(DEFAULT_CATALOG).get("smollm2-135m")
    assert spec is not None
    path = spec.sources["llamacpp"].resolve()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size > 90_000_000


def test_catalog_file_with_path_source(tmp_path: Path) -> None:
    f = tmp_path / "models.yaml"
    f.write_text("models:\n  m:\n    context_length: 99\n    sources:\n      llamacpp: {path: /x/y.gguf}\n")
    spec = Catalog.load(f).get("m")
    assert spec is not None
    assert spec.id == "m" and spec.context_length == 99
    assert spec.sources["llamacpp"].resolve() == Path("/x/y.gguf")
    assert spec.defaults.max_tokens is None


def test_source_needs_exactly_one_location() -> None:
    with pytest.raises(ValidationError):
        ModelSource()
    with pytest.raises(ValidationError):
        ModelSource(path=Path("/a"), package="b")


def test_missing_package_is_a_clear_error() -> None:
    with pytest.raises(FileNotFoundError, match="not installed"):
        ModelSource(package="no_such_model_package_xyz", file="m.gguf").resolve()
