"""The monitoring pack checked by the real promtool (Debian's prometheus package): rule syntax, the
rules' unit tests (every alert firing and not firing, every recording rule), the Prometheus configs,
and every dashboard query and variable selector parsed as PromQL."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests import monitoring_pack as pack


def promtool(*args: str, cwd: Path | None = None) -> str:
    res = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120, cwd=cwd)
    out = res.stdout + res.stderr
    assert res.returncode == 0, f"promtool {' '.join(args)}:\n{out}"
    return out


def test_promtool_check_rules() -> None:
    out = promtool("check", "rules", *map(str, pack.RULE_FILES))
    assert out.count("SUCCESS") == 2, out


def test_promtool_test_rules() -> None:
    out = promtool("test", "rules", *(p.name for p in pack.RULE_TESTS), cwd=pack.RULE_TESTS[0].parent)
    assert out.count("SUCCESS") == len(pack.RULE_TESTS), out


def test_promtool_check_config_of_the_examples() -> None:
    for name in ("prometheus.example.yaml", "scrape-static.yaml"):
        out = promtool("check", "config", str(pack.MONITORING / "prometheus" / name))
        assert "FAILED" not in out, out
    # scrape-eks.yaml uses kubernetes_sd_configs, which Debian's build of Prometheus leaves out;
    # tests/integration/test_monitoring.py runs its relabelling with file_sd instead.


def test_every_dashboard_query_parses(tmp_path: Path) -> None:
    exprs = [q.expr for q in pack.dashboard_queries()] + pack.variable_selectors()
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = promtool("check", "rules", str(path))
    assert f"SUCCESS: {len(rules)} rules found" in out, out
