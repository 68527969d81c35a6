"""The alert rules, checked and unit-tested by Prometheus's own promtool, and every
query of the rules and the Grafana dashboard naming a metric mmq really exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import redis
import yaml

from core.serving.exporter import PrometheusSink
from core.serving.metrics import BatchMetrics
from producer.ops.rules import MONITORING, RULES, load_thresholds, threshold_rules

ROOT = Path(__file__).parents[3]
DASHBOARD = MONITORING / "grafana" / "dashboards" / "mmq-overview.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool is not installed (Debian package prometheus)")
# A PromQL name: a metric or recording rule; the words that look like one but are not.
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
PROMQL_WORDS = {
    "sum", "max", "min", "by", "on", "and", "or", "unless", "group_left", "scalar",
    "vector", "rate", "increase", "delta", "histogram_quantile", "le", "m", "s",
}


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


@needs_promtool
def test_promtool_checks_the_rules():
    r = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in r.stdout


@needs_promtool
def test_promtool_unit_tests_pass():
    """alerts_test.yml: every alert's firing and non-firing series."""
    r = subprocess.run([PROMTOOL, "test", "rules", "alerts_test.yml"], cwd=MONITORING,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


@needs_promtool
def test_promtool_checks_the_compose_prometheus_config(tmp_path):
    """prometheus.yml as compose mounts it: the rule file at its mounted path."""
    cfg = yaml.safe_load((MONITORING / "prometheus.yml").read_text())
    cfg["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    r = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_is_tested_documented_and_has_a_runbook():
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    listed = (ROOT / "docs" / "alerts.md").read_text()
    for rule in _alerts():
        name = rule["alert"]
        mine = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in mine), f"{name}: no test sees it fire"
        assert any(not c["exp_alerts"] for c in mine), f"{name}: no test sees it silent"
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        assert notes["runbook_url"] == f"docs/runbooks/{name}.md"
        runbook = ROOT / notes["runbook_url"]
        assert runbook.is_file(), f"{name}: {runbook} is missing"
        text = runbook.read_text()
        for part in ("## What it means", "## Confirm", "## What to do"):
            assert part in text, f"{runbook}: no '{part}' section"
        assert f"`{name}`" in listed, f"docs/alerts.md does not list {name}"
        assert rule["labels"]["severity"] in ("page", "ticket")


def test_thresholds_live_in_one_place():
    """Every threshold is a constant recording rule that docs/alerts.md lists; alerts
    compare against those rules, never against a number of their own."""
    t = load_thresholds()
    assert t.oldest_queued_s > 0 and 0 < t.failure_ratio < 1
    assert set(t.latency_p95_s) == {"text", "image", "audio"}
    listed = (ROOT / "docs" / "alerts.md").read_text()
    for name, _labels in threshold_rules():
        assert f"mmq:threshold:{name}" in listed
    for rule in _alerts():
        bare = re.sub(r"\[[0-9]+[smh]\]|\"[^\"]*\"|0\.95", "", rule["expr"])
        numbers = [n for n in re.findall(r"(?<![\w.:])\d+(?:\.\d+)?", bare) if n != "0"]
        assert not numbers, f"{rule['alert']}: threshold {numbers} outside mmq:threshold:*"


def _exported_names(redis_url: str, tmp_path) -> set[str]:
    """Every family the API and a worker export, scraped from the real collectors."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from core import store
    from core.config import Settings
    from core.store.migrations import upgrade
    from producer.api.metrics import metrics_registry

    db = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(db)
    engine = store.make_engine(db)

    class Sessions:  # what the collector asks of the API's store client
        def sessions(self):
            return store.session_factory(engine)()

    api = metrics_registry(Settings(broker_url=redis_url, database_url=db), Sessions(),
                           redis.Redis.from_url(redis_url))
    worker = PrometheusSink("text-1@h", "text", BatchMetrics()).registry
    names = set()
    for reg in (api, worker):
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            names |= {s.name for s in fam.samples} | {fam.name}
            if fam.type == "histogram":  # a family with no observation yet has no samples
                names |= {fam.name + x for x in ("_bucket", "_sum", "_count")}
    engine.dispose()
    return names


def _names_in(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", "", expr)  # labels, strings, ranges
    expr = re.sub(r"\b(by|on|without|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    return {n for n in NAME.findall(expr) if n not in PROMQL_WORDS and not n[0].isdigit()}


def test_every_query_names_an_exported_metric(broker_url, tmp_path):
    exported = _exported_names(broker_url, tmp_path)
    exported |= {f"mmq:threshold:{n}" for n, _ in threshold_rules()} | {"up"}
    dash = json.loads(DASHBOARD.read_text())
    exprs = {f"dashboard: {p['title']} {t['refId']}": t["expr"] for p in dash["panels"]
             for t in p["targets"]}
    exprs |= {f"rule {r.get('alert') or r.get('record')}": r["expr"] for r in _rules()}
    for where, expr in exprs.items():
        missing = _names_in(expr) - exported
        assert not missing, f"{where}: {sorted(missing)} not exported"


def test_the_dashboard_is_a_provisionable_grafana_dashboard():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "mmq-overview" and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    for topic in ("throughput", "latency", "queue age", "fail", "batch size"):
        assert topic in titles, topic
    for p in dash["panels"]:
        assert p["datasource"]["uid"] == "mmq-prometheus" and p["targets"]
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert all(t["refId"] and t["expr"] for t in p["targets"])
    ds = yaml.safe_load((MONITORING / "grafana/provisioning/datasources/prometheus.yml")
                        .read_text())["datasources"]
    assert [d["uid"] for d in ds] == ["mmq-prometheus"]
