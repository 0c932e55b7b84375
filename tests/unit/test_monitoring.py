"""The monitoring pack (monitoring/, docs/monitoring.md) without running anything: rules and the
dashboard refer only to series nodeagent exports or the rules record, add no unbounded label, every
alert has a severity and a runbook section, every rule and alert has promtool test cases, and the
dashboard is ready for Grafana's file provisioning. promtool itself runs in
tests/integration/test_monitoring_rules.py (unit tests start no process)."""

from __future__ import annotations

import re

import pytest
import yaml

from nodeagent.config.model import MetricsConfig
from nodeagent.run.http import parse_listen
from nodeagent.run.metrics import Metrics
from tests import monitoring_pack as pack

# Labels a rule may aggregate by, match on or add: target labels the scrape configs set (cluster,
# node, and Prometheus' job/instance), nodeagent's closed or config-bounded labels, and the ones
# the rules add (quantile; severity on alerts). Never a pod, namespace, container, image or digest.
ALLOWED_LABELS = {"cluster", "node", "job", "instance", "registry", "result", "mirror", "le", "component"}
RULE_ADDED_LABELS = {"quantile", "severity"}
FORBIDDEN = re.compile(r"pod|namespace|container|image\b|digest|secret|token|password|auth|uid")


def known_series() -> set[str]:
    return pack.exported_series(Metrics().registry) | pack.recorded_names() | {"up"}


def all_rule_exprs() -> list[tuple[str, str]]:
    return [
        (r.get("record") or r["alert"], str(r["expr"]))
        for path in pack.RULE_FILES
        for r in pack.load_rules(path)
    ]


def test_metric_name_extraction() -> None:
    e = (
        'sum by (le) (rate(a_bucket{x=~"$y", by="on"}[5m])) / ignoring (result) group_left '
        "sum(b:c:d) and on (n) max by (n) (c_total offset 5m) > bool 0.5"
    )
    assert pack.metric_names(e) == {"a_bucket", "b:c:d", "c_total"}
    assert pack.grouping_labels(e) == {"le", "result", "n"}
    assert pack.metric_names('absent(up{job="nodeagent"})') == {"up"}


def test_rules_refer_only_to_exported_or_recorded_series() -> None:
    known = known_series()
    for name, expr in all_rule_exprs():
        unknown = pack.metric_names(expr) - known
        assert not unknown, f"{name}: {sorted(unknown)} is neither exported by nodeagent nor recorded"


def test_every_recorded_name_follows_level_metric_operation() -> None:
    for name in pack.recorded_names():
        level, metric, op = name.split(":")
        assert metric.startswith("nodeagent_") or metric == "nodeagent_up", name
        assert set(level.split("_")) <= ALLOWED_LABELS, name
        assert op, name


def test_rules_add_no_label_that_could_carry_a_pod_name_digest_or_secret() -> None:
    for path in pack.RULE_FILES:
        for r in pack.load_rules(path):
            name, expr = r.get("record") or r["alert"], str(r["expr"])
            assert not re.search(r"\bwithout\b|label_replace|label_join", expr), name  # keep unknown labels
            assert pack.grouping_labels(expr) <= ALLOWED_LABELS, name
            assert set(r.get("labels", {})) <= RULE_ADDED_LABELS, name
            assert "nodeagent_image_last_pull_duration_seconds" not in expr, name  # the per-image gauge
            for label in pack.grouping_labels(expr) | set(r.get("labels", {})):
                assert not FORBIDDEN.search(label), (name, label)


def test_raw_series_that_alerts_pass_through_have_bounded_labels() -> None:
    """Alerts without aggregation keep the series' own labels: those must be bounded too."""
    m = Metrics()
    m.set_degraded("upstream", True)
    labels_of: dict[str, set[str]] = {}
    for fam in m.registry.collect():
        for s in fam.samples:
            labels_of.setdefault(s.name, set()).update(s.labels)
    for r in pack.alerts():
        expr = str(r["expr"])
        if re.search(r"\b(sum|max|min|avg|count|quantile|topk|absent)\b", expr):
            continue  # aggregated: checked above
        for name in pack.metric_names(expr) - pack.recorded_names() - {"up"}:
            assert labels_of.get(name, set()) <= ALLOWED_LABELS, (r["alert"], name, labels_of.get(name))


def test_every_alert_has_a_severity_summary_and_a_runbook_section() -> None:
    anchors = pack.heading_anchors(pack.DOCS.read_text())
    names = [r["alert"] for r in pack.alerts()]
    assert len(names) == len(set(names))
    for r in pack.alerts():
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        url = r["annotations"]["runbook_url"]
        assert url == f"docs/monitoring.md#{r['alert'].lower()}", r["alert"]
        assert r["alert"].lower() in anchors, f"docs/monitoring.md has no runbook section {r['alert']}"
        assert "for" in r, f"{r['alert']}: no `for` (one bad scrape would page)"


def test_every_alert_has_a_firing_and_a_not_firing_promtool_case() -> None:
    cases: dict[str, set[bool]] = {}
    doc = yaml.safe_load(pack.RULE_TESTS[1].read_text())
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            cases.setdefault(case["alertname"], set()).add(bool(case["exp_alerts"]))
    for r in pack.alerts():
        assert cases.get(r["alert"]) == {True, False}, f"{r['alert']}: cases {cases.get(r['alert'])}"


def test_every_recording_rule_has_a_promtool_case() -> None:
    doc = yaml.safe_load(pack.RULE_TESTS[0].read_text())
    tested = {
        name
        for test in doc["tests"]
        for case in test["promql_expr_test"]
        if case["exp_samples"]
        for name in pack.metric_names(case["expr"])
    }
    assert pack.recorded_names() <= tested, sorted(pack.recorded_names() - tested)


# --- the dashboard ----------------------------------------------------------------------------
def test_dashboard_is_provisioning_ready_with_datasource_cluster_node_registry_variables() -> None:
    dash = pack.dashboard()
    assert dash["uid"] and dash["title"] and "__inputs" not in dash and dash.get("id") is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("cluster", "node", "registry"):
        v = variables[name]
        assert v["type"] == "query" and v["includeAll"] and v["allValue"] == ".*" and v["multi"], name
        assert v["datasource"]["uid"] == "${datasource}", name
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in pack.panels(dash):
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
            assert t["expr"].strip(), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0 and g["x"] + g["w"] <= 24, p["title"]


def test_dashboard_has_the_panels_operators_need() -> None:
    text = " ".join(q.expr for q in pack.dashboard_queries())
    kinds = {q.kind for q in pack.dashboard_queries()}
    assert {"timeseries", "heatmap", "table"} <= kinds
    for needle in (
        "nodeagent_image_pulls:rate5m",  # pulls/s by result
        "nodeagent_image_pull_duration_seconds_bucket:rate5m",  # heatmap
        "nodeagent_image_pull_bytes:rate5m",
        "nodeagent_image_cache_requests:rate5m",  # hit ratio
        "nodeagent_image_pulls_in_flight",
        "nodeagent_imagefs_used_ratio",
        "nodeagent_image_eviction_threshold_ratio",
        "nodeagent_image_evictions:rate5m",
        "nodeagent_mirror_up",
        "nodeagent_image_last_pull_duration_seconds",  # top slow images
    ):
        assert needle in text, needle


def test_dashboard_queries_refer_only_to_exported_or_recorded_series() -> None:
    known = known_series()
    for q in pack.dashboard_queries():
        unknown = pack.metric_names(q.expr) - known
        assert not unknown, f"panel {q.panel!r} {q.ref}: {sorted(unknown)}"
        assert "$" not in q.expr, f"panel {q.panel!r}: unknown variable in {q.expr}"
    for sel in pack.variable_selectors():
        assert pack.metric_names(sel) <= known, sel


def test_dashboard_fleet_panels_use_recording_rules_not_raw_counters() -> None:
    """Cheap at fleet scale: no panel rates a raw nodeagent counter or histogram over every node,
    except the mirror fail-over counter (a handful of series per mirror)."""
    for q in pack.dashboard_queries():
        for m in re.finditer(r"rate\((\w+)", q.expr):
            assert m.group(1) == "nodeagent_mirror_failovers_total", (q.panel, m.group(1))


# --- scrape configs ---------------------------------------------------------------------------
def test_eks_scrape_config_points_node_discovery_at_the_metrics_port() -> None:
    job = yaml.safe_load(pack.SCRAPE_EKS.read_text())["scrape_configs"][0]
    assert job["job_name"] == "nodeagent"  # the rules' up{job="nodeagent"}
    assert job["kubernetes_sd_configs"] == [{"role": "node"}]
    port = parse_listen(MetricsConfig().listen)[1]
    (addr,) = [r for r in job["relabel_configs"] if r.get("target_label") == "__address__"]
    # Prometheus anchors relabel regexes; kubernetes_sd's address is <InternalIP>:<kubelet port>
    m = re.fullmatch(addr["regex"], "10.0.1.17:10250")
    assert m is not None
    assert addr["replacement"].replace("${1}", m.group(1)) == f"10.0.1.17:{port}"
    targets = {r.get("target_label") for r in job["relabel_configs"]}
    assert {"node", "cluster"} <= targets


@pytest.mark.parametrize("name", ["scrape-eks.yaml", "scrape-static.yaml", "prometheus.example.yaml"])
def test_scrape_configs_add_only_bounded_target_labels(name: str) -> None:
    doc = yaml.safe_load((pack.MONITORING / "prometheus" / name).read_text())
    for job in doc["scrape_configs"]:
        for r in job.get("relabel_configs", []):
            assert r.get("action") != "labelmap", name  # would copy every node label
            t = r.get("target_label")
            assert t is None or t.startswith("__") or t in ALLOWED_LABELS, (name, t)
        for sc in job.get("static_configs", []):
            assert set(sc.get("labels", {})) <= ALLOWED_LABELS, name
