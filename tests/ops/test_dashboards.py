"""The Grafana dashboard and the KEDA example against what the API serves: every metric a panel, a dashboard
variable or a scaling trigger queries is one the real app's /metrics declares (run against a real Redis),
and the dashboard's structure is one Grafana provisions."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from fastapi.testclient import TestClient

from api.app import create_app
from ops.redis_server import RedisServer
from queueing.catalog import DEFAULT_CATALOG, Catalog
from queueing.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "ops" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "inferq.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "inferq.yml"
SCALEDOBJECT = ROOT / "ops" / "keda" / "scaledobject.yaml"

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_METRIC = re.compile(r"\binferq_[A-Za-z0-9_:]*")
# The series a histogram family serves under other names than its own; a summary, the last two.
_HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """The inferq metric names a PromQL expression reads (label values, which are strings, left out)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def families(exposition: str) -> dict[str, str]:
    """Metric family -> type, from the ``# TYPE`` lines of a Prometheus text exposition."""
    found = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            found[name] = kind
    return found


def missing(names: set[str], served: dict[str, str]) -> list[str]:
    """The names that are neither a served family nor one of a served histogram's or summary's series."""

    def known(name: str) -> bool:
        if name in served:
            return True
        for suffix in _HISTOGRAM_SERIES:
            kinds = ("histogram",) if suffix == "_bucket" else ("histogram", "summary")
            if name.endswith(suffix) and served.get(name.removesuffix(suffix)) in kinds:
                return True
        return False

    return sorted(n for n in names if not known(n))


def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in panels() for t in p["targets"]]
    variables = dashboard()["templating"]["list"]
    return exprs + [v["definition"] for v in variables if v["type"] == "query"]


def scaledobject() -> dict[str, Any]:
    return next(d for d in yaml.safe_load_all(SCALEDOBJECT.read_text()) if d["kind"] == "ScaledObject")


@pytest.fixture(scope="module")
def served(redis_server: RedisServer) -> Iterator[dict[str, str]]:
    redis.Redis.from_url(redis_server.url).flushdb()
    app = create_app(Settings(redis_url=redis_server.url), Catalog.load(DEFAULT_CATALOG))
    with TestClient(app) as http:
        r = http.get("/metrics")
    assert r.status_code == 200
    yield families(r.text)


def test_every_metric_the_dashboard_queries_is_served(served: dict[str, str]) -> None:
    names = set().union(*(metric_names(e) for e in dashboard_exprs()))
    # The panels read the worker counters, the API's histograms and error counter, and the scaling gauges.
    assert {"inferq_request_ttft_seconds_bucket", "inferq_request_errors_total"} <= names
    assert {"inferq_model_queue_depth", "inferq_token_backlog_seconds", "inferq_worker_tokens_total"} <= names
    assert missing(names, served) == []


def test_every_metric_the_keda_triggers_query_is_served(served: dict[str, str]) -> None:
    triggers = scaledobject()["spec"]["triggers"]
    names = set().union(*(metric_names(t["metadata"]["query"]) for t in triggers))
    assert {"inferq_model_queue_depth", "inferq_model_in_flight", "inferq_token_backlog_seconds"} <= names
    assert missing(names, served) == []


def test_the_check_finds_a_name_that_is_not_served(served: dict[str, str]) -> None:
    expr = (
        'sum by (code) (rate(inferq_made_up_total{queue=~"inferq_queue_depth"}[5m]))'
        " / histogram_quantile(0.5, rate(inferq_request_errors_total_bucket[5m]))"
        " + inferq_request_ttft_seconds_count + inferq_request_ttft_seconds_bucket"
    )
    names = metric_names(expr)
    assert names == {
        "inferq_made_up_total",
        "inferq_request_errors_total_bucket",
        "inferq_request_ttft_seconds_count",
        "inferq_request_ttft_seconds_bucket",
    }
    assert missing(names, served) == ["inferq_made_up_total", "inferq_request_errors_total_bucket"]


def test_panels_have_unique_ids_and_fit_the_grid_without_overlap() -> None:
    every = dashboard()["panels"]
    ids = [p["id"] for p in every]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for p in every:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("h", "w", "x", "y")) and g["h"] > 0 and g["w"] > 0
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = p["title"]


def test_every_target_queries_the_provisioned_datasource() -> None:
    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    assert dashboard()["schemaVersion"] >= 36  # datasources referred to by uid, not by name
    for p in panels():
        assert p["title"] and p["datasource"] == {"type": "prometheus", "uid": uid}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["uid"] == uid
    for v in dashboard()["templating"]["list"]:
        assert v["datasource"]["uid"] == uid


def test_the_provider_reads_the_folder_the_compose_file_mounts() -> None:
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"
    source = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"


def test_the_scaledobject_scales_the_deployment_it_names() -> None:
    docs = list(yaml.safe_load_all(SCALEDOBJECT.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    spec = scaledobject()["spec"]
    assert scaledobject()["apiVersion"] == "keda.sh/v1alpha1"
    assert spec["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    # Scaled to zero, nothing would wake it: a request with no live worker is refused, not queued.
    assert spec["minReplicaCount"] >= 1
    for t in spec["triggers"]:
        assert t["type"] == "prometheus" and t["metricType"] in ("AverageValue", "Value")
        assert float(t["metadata"]["threshold"]) > 0
        assert t["metadata"]["serverAddress"].startswith("http")
