"""The model manager's budget, LRU eviction, pinning and keep-alive, on the scripted engine (no weights to
load, so what is tested is the bookkeeping)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from queueing.catalog import Catalog
from workers.models import CannotLoad, ModelManager


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"x" * 1000)
    source = {"scripted": {"path": str(weights)}}
    return Catalog.model_validate({"models": {m: {"id": m, "sources": source} for m in ("a", "b", "c")}})


def test_loading_past_max_models_evicts_the_least_recently_used_idle_model(catalog: Catalog) -> None:
    mm = ModelManager(catalog, "scripted", max_models=2)
    mm.load("a")
    mm.load("b")
    with mm.using("b"):
        pass  # b is now the most recently used
    mm.load("c")
    deadline = time.monotonic() + 5
    while "a" in mm.statuses() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(mm.loaded()) == ["b", "c"]


def test_pinned_and_busy_models_are_never_evicted(catalog: Catalog) -> None:
    mm = ModelManager(catalog, "scripted", max_models=2)
    mm.load("a", pinned=True)
    mm.load("b")
    with mm.using("b"), pytest.raises(CannotLoad, match="budget is full"):
        mm.load("c")
    assert sorted(mm.loaded()) == ["a", "b"]


def test_memory_budget_counts_weight_bytes(catalog: Catalog) -> None:
    mm = ModelManager(catalog, "scripted", memory_budget=1500)
    mm.load("a", pinned=True)
    with pytest.raises(CannotLoad):
        mm.load("b")
    assert mm.statuses()["a"].bytes == 1000


def test_idle_unpinned_model_expires_after_its_keep_alive(catalog: Catalog) -> None:
    mm = ModelManager(catalog, "scripted")
    mm.load("a", keep_alive=10)
    mm.load("b", pinned=True, keep_alive=10)
    mm.load("c")  # no keep-alive: stays
    now = time.time()
    assert mm.expire_idle(now + 5) == []
    assert mm.expire_idle(now + 11) == ["a"]
    assert sorted(mm.loaded()) == ["b", "c"]


def test_unload_waits_for_running_jobs_and_reports_states(catalog: Catalog) -> None:
    seen: list[tuple[str, str | None]] = []
    mm = ModelManager(catalog, "scripted")
    mm.on_change = lambda model, state: seen.append((model, state))
    mm.load("a")
    assert mm.unload("a")
    assert not mm.unload("a")
    assert seen == [("a", "loading"), ("a", "ready"), ("a", "unloading"), ("a", None)]


def test_unknown_or_unlocatable_model_cannot_load(catalog: Catalog, tmp_path: Path) -> None:
    mm = ModelManager(catalog, "llamacpp")
    with pytest.raises(CannotLoad):
        mm.load("nope")
    with pytest.raises(CannotLoad, match="no source for engine"):
        mm.load("a")
    assert mm.capable() == []
    assert ModelManager(catalog, "scripted").capable() == ["a", "b", "c"]
