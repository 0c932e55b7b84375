"""Reading the monitoring pack (monitoring/): its rule files, the Grafana dashboard's queries, and
the metric names a PromQL expression refers to. Used by tests/unit/test_monitoring.py (structure,
names, labels) and tests/integration/test_monitoring*.py (promtool, a real Prometheus).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "monitoring"
RECORDING_RULES = MONITORING / "rules" / "nodeagent.rules.yaml"
ALERT_RULES = MONITORING / "rules" / "nodeagent.alerts.yaml"
RULE_FILES = (RECORDING_RULES, ALERT_RULES)
RULE_TESTS = (MONITORING / "tests" / "recording.test.yaml", MONITORING / "tests" / "alerts.test.yaml")
DASHBOARD = MONITORING / "grafana" / "nodeagent-dashboard.json"
SCRAPE_EKS = MONITORING / "prometheus" / "scrape-eks.yaml"
DOCS = REPO / "docs" / "monitoring.md"

# What the dashboard's variables become when its queries are checked or run outside Grafana: every
# cluster, node and registry; $__rate_interval as Grafana computes it for a 15 s scrape interval.
GRAFANA_VARIABLES = {"$cluster": ".*", "$node": ".*", "$registry": ".*", "$__rate_interval": "1m"}

PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "offset", "inf", "nan",
}  # fmt: skip


@dataclass(frozen=True)
class Query:
    panel: str
    ref: str
    expr: str  # Grafana variables substituted
    legend: str
    kind: str  # timeseries, heatmap, table


def load_rules(path: Path) -> list[dict[str, Any]]:
    doc = yaml.safe_load(path.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for r in load_rules(RECORDING_RULES)}


def alerts() -> list[dict[str, Any]]:
    return load_rules(ALERT_RULES)


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def substitute(expr: str, variables: dict[str, str] | None = None) -> str:
    for name, value in sorted((variables or GRAFANA_VARIABLES).items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def panels(dash: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for p in (dash or dashboard())["panels"]:
        if p["type"] == "row":
            out.extend(p.get("panels", []))
        else:
            out.append(p)
    return out


def dashboard_queries(
    dash: dict[str, Any] | None = None, variables: dict[str, str] | None = None
) -> list[Query]:
    return [
        Query(p["title"], t["refId"], substitute(t["expr"], variables), t.get("legendFormat", ""), p["type"])
        for p in panels(dash)
        for t in p.get("targets", [])
    ]


def variable_selectors(dash: dict[str, Any] | None = None) -> list[str]:
    """The series selectors of the dashboard's ``label_values(selector, label)`` variables."""
    out = []
    for v in (dash or dashboard())["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
        if m is None:
            raise ValueError(f"variable {v['name']}: not label_values(selector, label): {q!r}")
        out.append(substitute(m.group(1)))
    return out


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w:.])([A-Za-z_:][\w:]*)(\s*\()?")


def metric_names(expr: str) -> set[str]:
    """Metric names an expression selects (function names, keywords, label names left out)."""
    e = _STRING.sub('""', expr)
    e = _MATCHERS.sub(" ", e)
    e = _RANGE.sub(" ", e)
    e = _GROUPING.sub(" ", e)
    names = set()
    for m in _IDENT.finditer(e):
        name, call = m.group(1), m.group(2)
        if call or name.lower() in PROMQL_KEYWORDS:
            continue
        names.add(name)
    return names


def grouping_labels(expr: str) -> set[str]:
    """Label names in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    labels = set()
    for m in _GROUPING.finditer(_STRING.sub('""', expr)):
        labels |= {x.strip() for x in m.group(2).split(",") if x.strip()}
    return labels


def exported_series(registry: CollectorRegistry) -> set[str]:
    """Every series name a registry can expose: counters with ``_total``, histograms with
    ``_bucket``/``_sum``/``_count``, info metrics with ``_info`` (families without samples too)."""
    names = set()
    for fam in registry.collect():
        base = fam.name
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "info": ("_info",),
            "summary": ("", "_sum", "_count", "_created"),
        }.get(fam.type, ("",))
        names |= {base + s for s in suffixes}
        names |= {s.name for s in fam.samples}
    return names


def scraped_series(text: str) -> set[str]:
    """Series names in a /metrics exposition (a real scrape)."""
    from prometheus_client.parser import text_string_to_metric_families

    return {s.name for fam in text_string_to_metric_families(text) for s in fam.samples}


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for a Markdown file's headings."""
    out = set()
    for line in markdown.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            out.add(slug)
    return out
