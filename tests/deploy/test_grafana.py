"""The provisioned Grafana dashboards: valid JSON, and every query names only metrics (and labels) the service
really declares in `service.metrics`."""

import json
import re
from pathlib import Path

import pytest
from prometheus_client.metrics import MetricWrapperBase

from service import metrics

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "dashboards").glob("*.json"))
SELECTOR = re.compile(r"\b(t2i_[a-z0-9_]+)(\{[^}]*\})?")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
PROMQL_WORDS = {"le"}


def declared() -> dict[str, set[str]]:
    """Every sample name the service can export -> the label names it carries."""
    out: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        name, labels = value._name, set(value._labelnames)
        suffixes = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}[value._type]
        for suffix in suffixes:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        if isinstance(query, dict):
            found.append((f"variable {variable['name']}", query["query"]))
    return found


def test_there_are_dashboards():
    assert DASHBOARDS, "no dashboards under deploy/grafana/dashboards"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_every_query_uses_declared_metrics_and_labels(path):
    dashboard = json.loads(path.read_text())
    known = declared()
    exprs = expressions(dashboard)
    assert len(exprs) >= 10
    used = set()
    for title, expr in exprs:
        names = SELECTOR.findall(expr)
        assert names, f"{title}: no t2i_ metric in {expr!r}"
        for name, selector in names:
            assert name in known, f"{title}: {name} is not a metric the service exports"
            used.add(name)
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!=|!~|=)", selector):
                assert label in known[name], f"{title}: {name} has no label {label!r}"
        all_labels = set().union(*(known[n] for n, _ in names))
        for group in GROUPING.findall(expr):
            for label in filter(None, (g.strip() for g in group.split(","))):
                assert label in all_labels | PROMQL_WORDS, f"{title}: grouping by unknown label {label!r}"
    # the per-encoder panels the dashboards promise
    for needed in ("t2i_encode_duration_seconds_bucket", "t2i_job_duration_seconds_bucket", "t2i_jobs_total",
                   "t2i_encoder_resident_bytes", "t2i_job_peak_memory_bytes", "t2i_queue_depth",
                   "t2i_queue_wait_duration_seconds_bucket", "t2i_workers_live", "t2i_ab_votes_total",
                   "t2i_embedding_cache_requests_total", "t2i_batch_size_bucket", "t2i_route_decisions_total"):
        assert needed in used, f"no panel uses {needed}"


def test_the_checker_rejects_a_made_up_metric():
    known = declared()
    assert "t2i_encode_duration_seconds_bucket" in known and "t2i_made_up_seconds" not in known
    assert "encoder" in known["t2i_jobs_total"] and "colour" not in known["t2i_jobs_total"]
