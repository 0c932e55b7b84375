"""The monitoring pack against a real Prometheus (Debian's package) scraping real ``nodeagent run``
daemons on a sandbox node under load (issue 17).

Discovery is the EKS scrape config itself (monitoring/prometheus/scrape-eks.yaml, relabelling
unchanged), fed by file_sd with the labels Kubernetes node discovery sets (Debian's Prometheus is
built without kubernetes_sd): ``__address__`` = <node IP>:<kubelet port>, the node's name and its
``nodeagent.io/enabled`` label. Each "node" is a loopback address 127.x.y.z, so every agent really
listens on metrics.listen's port 9847 and the relabelling to that port is what makes it scraped.

- node-a: containerd whose image store is a 160 MB loop-mounted ext4, a hung mirror in front of
  the registry (its probes take it out of hosts.toml), eviction at 50/30 with ``images.protect``
  covering monitoring/keep*: pulls that churn and get evicted, ImageStatus hits and misses, pulls
  refused (unauthorized) and missing (not_found), protected pulls until the disk is full (no_space,
  eviction unable to reach low).
- node-b: an agent whose containerd does not exist (upstream unavailable).
- node-c: discovered, nothing listening (target down). node-d: not labelled, so not scraped.

The rules are loaded unchanged (production ``for:`` durations: an alert is pending as soon as its
expression holds, which is what this test waits for), with 1 s scrape and evaluation intervals.
Then every recording rule and every dashboard query must return data, and every dashboard panel is
rendered to a PNG with matplotlib (Grafana cannot be installed here) in
``$NODEAGENT_DASHBOARD_PNG_DIR`` (default: pytest's tmp_path, printed).
"""

from __future__ import annotations

import asyncio
import copy
import json
import os
import random
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.apply.targets.mirrors import render_hosts_toml
from nodeagent.config.model import Mirror
from nodeagent.cri.client import CriClient, CriError
from tests import monitoring_pack as pack
from tests.sandbox import NodeAgent, PushedImage, Registry, Sandbox, SandboxError
from tests.sandbox.prometheus import Prometheus

MiB = 1 << 20
IMAGE_MIB = 8
CHURN = 6
KEEP_MAX = 16
METRICS_PORT = 9847  # metrics.listen's default port: what the EKS relabelling points at
ALLOWED_RESULT_LABELS = {"cluster", "node", "registry", "result", "mirror", "le", "quantile", "component"}
EXPECTED_ALERTS = {
    "NodeagentPullsUnauthorized",
    "NodeagentPullsFailing",  # not_found
    "NodeagentPullsNoSpace",
    "NodeagentImagefsEvictionStuck",
    "NodeagentMirrorDown",
    "NodeagentDegraded",  # mirrorHealth
    "NodeagentUpstreamUnavailable",
    "NodeagentTargetDown",
}
# Not exercised here (promtool unit tests cover them): NodeagentPullsRateLimited (no registry here
# answers 429), NodeagentSlowPulls (p95 over 2 minutes), NodeagentAbsent (targets exist).


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[monitoring] {line}")


def loopback_host() -> str:
    return f"127.{random.randint(64, 250)}.{random.randint(0, 255)}.{random.randint(1, 254)}"


def agent_on_port_9847(
    sandbox: Sandbox,
    upstream: Any,
    config: dict[str, Any],
    prepare: Callable[[NodeAgent], None] | None = None,
) -> tuple[NodeAgent, str]:
    """``nodeagent run`` with metrics.listen = <a free 127.x.y.z>:9847 (another address if taken)."""
    for _ in range(5):
        host = loopback_host()
        agent = sandbox.nodeagent(
            upstream, start=False, config={**config, "metrics": {"listen": f"{host}:{METRICS_PORT}"}}
        )
        if prepare is not None:
            prepare(agent)
        try:
            agent.start()
        except SandboxError as e:
            if "in use" in str(e).lower():
                continue
            raise
        return agent, host
    raise SandboxError("no free 127.x.y.z:9847 after 5 tries")


def sd_group(host: str, node: str, enabled: bool) -> dict[str, Any]:
    """A target as Kubernetes node discovery makes it: the kubelet's port, the node's labels."""
    labels = {"__meta_kubernetes_node_name": node, "instance": node}
    if enabled:
        labels["__meta_kubernetes_node_label_nodeagent_io_enabled"] = "true"
    return {"targets": [f"{host}:10250"], "labels": labels}


def prometheus_config(sd_file: Path) -> dict[str, Any]:
    job = copy.deepcopy(yaml.safe_load(pack.SCRAPE_EKS.read_text())["scrape_configs"][0])
    del job["kubernetes_sd_configs"]
    job["file_sd_configs"] = [{"files": [str(sd_file)], "refresh_interval": "1s"}]
    job["scrape_interval"] = job["scrape_timeout"] = "1s"
    return {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(p) for p in pack.RULE_FILES],
        "scrape_configs": [job],
    }


async def pull(cri: CriClient, ref: str) -> str:
    """'' on success, else the failure text."""
    try:
        await cri.pull_image(ref, retry=False)
    except CriError as e:
        return str(e)
    return ""


async def load(
    endpoint: str,
    registry: Registry,
    auth_registry: Registry,
    first: PushedImage,
    churn: list[PushedImage],
    keep: list[PushedImage],
) -> dict[str, Any]:
    out: dict[str, Any] = {"no_space": 0, "keep_pulled": 0}
    async with CriClient(endpoint, timeout=30, pull_timeout=120) as cri:
        t0 = time.monotonic()
        assert await pull(cri, first.reference) == ""  # through the hung mirror: fail-over, retry
        out["first_pull_seconds"] = time.monotonic() - t0
        for img in churn:  # fills the disk past high: eviction removes the least recently used
            assert await pull(cri, img.reference) == ""
            await cri.image_status(img.reference)  # hit
            await cri.image_status(f"{registry.host}/monitoring/absent:{img.tag}")  # miss
            await asyncio.sleep(0.4)
        # Failures spread over several scrapes: a counter is born at its first increment, and only
        # the increments Prometheus sees after that count in rate() / increase().
        for i in range(4):
            assert await pull(cri, f"{auth_registry.host}/monitoring/private:v{i}")  # no credentials
            assert await pull(cri, f"{registry.host}/monitoring/missing:v{i}")
            await cri.image_status(first.reference)
            await asyncio.sleep(1.5)
        for img in keep:  # protected: eviction can only remove the churn images, then the disk fills
            err = await pull(cri, img.reference)
            if not err:
                out["keep_pulled"] += 1
                continue
            assert "no space left on device" in err, err
            out["no_space"] += 1
            if out["no_space"] >= 3:
                break
            await asyncio.sleep(1.5)
    return out


def test_prometheus_scrapes_the_fleet_rules_record_alerts_pend_dashboard_queries_return_data(
    sandbox: Sandbox,
    registry: Registry,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    started = time.time()
    auth_registry = sandbox.registry(auth=("mon", "secret-pw"))
    hung = sandbox.hung_server()
    first = sandbox.image(registry, "monitoring/first", "v1", layers=1, layer_size=1 * MiB)
    churn = [
        sandbox.image(registry, f"monitoring/churn{i}", "v1", layer_size=IMAGE_MIB * MiB)
        for i in range(CHURN)
    ]
    keep = [
        sandbox.image(registry, f"monitoring/keep{i}", "v1", layer_size=IMAGE_MIB * MiB)
        for i in range(KEEP_MAX)
    ]

    # node-a: image store on a small disk, the hung mirror first in hosts.toml (nodeagent's file)
    fs = sandbox.loopfs(160)
    node = sandbox.containerd([auth_registry], root_dir=fs.mountpoint / "root")
    hosts = node.hosts_dir / registry.host / "hosts.toml"
    hosts.parent.mkdir(parents=True, exist_ok=True)
    hosts.write_text(render_hosts_toml(registry.host, [Mirror(hung.url)]))

    def link_hosts_dir(agent: NodeAgent) -> None:
        link = agent.root / "etc/containerd/certs.d"
        link.parent.mkdir(parents=True)
        link.symlink_to(node.hosts_dir)

    agent_a, host_a = agent_on_port_9847(
        sandbox,
        node,
        {
            "containerd": {
                "hostsDir": "/etc/containerd/certs.d",
                "mirrors": {registry.host: [{"endpoint": hung.url}]},
            },
            "eviction": {
                "highThresholdPercent": 50,
                "lowThresholdPercent": 30,
                "minUnusedAge": "0s",
                "interval": "5s",
            },
            "images": {"protect": ["*/monitoring/keep*"]},
        },
        prepare=link_hosts_dir,
    )
    agent_b, host_b = agent_on_port_9847(sandbox, f"unix://{sandbox.dir}/no-containerd.sock", {})
    host_c, host_d = loopback_host(), loopback_host()

    sd_file = sandbox.dir / "nodes.json"
    sd_file.write_text(
        json.dumps(
            [
                sd_group(host_a, "node-a", True),
                sd_group(host_b, "node-b", True),
                sd_group(host_c, "node-c", True),
                sd_group(host_d, "node-d", False),
            ]
        )
    )
    prom = Prometheus(sandbox.dir / "prometheus", prometheus_config(sd_file))
    sandbox.callback(prom.stop)
    prom.start()

    def scraped(node_name: str) -> bool:
        return any(r["value"][1] == "1" for r in prom.query(f'up{{job="nodeagent",node="{node_name}"}}'))

    try:
        prom.wait_for("node-a and node-b scraped", lambda: scraped("node-a") and scraped("node-b"), 60)
    except SandboxError as e:
        targets = [(t["labels"], t["scrapeUrl"], t["lastError"]) for t in prom.targets()["activeTargets"]]
        raise SandboxError(f"{e}; targets: {targets}; dropped: {prom.targets()['droppedTargets']}") from None

    # discovery: the kubelet's port became 9847; the unlabelled node is not a target
    active = prom.targets()["activeTargets"]
    by_node = {t["labels"].get("node"): t for t in active}
    assert set(by_node) == {"node-a", "node-b", "node-c"}, sorted(by_node)
    assert by_node["node-a"]["scrapeUrl"] == f"http://{host_a}:{METRICS_PORT}/metrics"
    assert by_node["node-c"]["scrapeUrl"] == f"http://{host_c}:{METRICS_PORT}/metrics"
    assert by_node["node-a"]["labels"] == {
        "cluster": "my-cluster",
        "instance": "node-a",
        "job": "nodeagent",
        "node": "node-a",
    }

    stats = asyncio.run(load(agent_a.proxy_endpoint, registry, auth_registry, first, churn, keep))
    report(capsys, f"load on node-a: {stats}")
    assert stats["no_space"] >= 2, stats

    # --- alerts: the expected ones become pending (or, for short `for:`, firing) ---------------
    def active_alerts() -> dict[str, set[str]]:
        out: dict[str, set[str]] = {}
        for a in prom.alerts():
            out.setdefault(a["labels"]["alertname"], set()).add(a["state"])
        return out

    try:
        prom.wait_for("expected alerts", lambda: set(active_alerts()) >= EXPECTED_ALERTS, 90)
    finally:
        report(capsys, f"alerts: {dict(sorted(active_alerts().items()))}")
    alerts = prom.alerts()
    by_name = {a["labels"]["alertname"]: a for a in alerts}
    assert by_name["NodeagentPullsUnauthorized"]["labels"]["registry"] == auth_registry.host
    assert by_name["NodeagentPullsFailing"]["labels"]["result"] == "not_found"
    assert by_name["NodeagentPullsNoSpace"]["labels"]["node"] == "node-a"
    assert by_name["NodeagentImagefsEvictionStuck"]["labels"]["node"] == "node-a"
    assert by_name["NodeagentMirrorDown"]["labels"]["mirror"] == hung.url
    assert {a["labels"]["component"] for a in alerts if a["labels"]["alertname"] == "NodeagentDegraded"} == {
        "mirrorHealth"
    }
    assert by_name["NodeagentUpstreamUnavailable"]["labels"]["node"] == "node-b"
    assert by_name["NodeagentTargetDown"]["labels"]["node"] == "node-c"
    for a in alerts:  # no alert carries a label outside the bounded set
        assert set(a["labels"]) <= ALLOWED_RESULT_LABELS | {"alertname", "severity", "job", "instance"}, a

    # --- every recording rule returns data, with bounded labels ---------------------------------
    empty = []
    for name in sorted(pack.recorded_names()):
        result = prom.query(name)
        if not result:
            empty.append(name)
        for r in result:
            assert set(r["metric"]) - {"__name__"} <= ALLOWED_RESULT_LABELS, (name, r["metric"])
    assert not empty, f"recording rules without data: {empty}"

    # --- every dashboard query and variable returns data; names exist in a real scrape -----------
    real = pack.scraped_series(agent_a.scrape()) | pack.scraped_series(agent_b.scrape())
    known = real | pack.recorded_names() | {"up"}
    no_data = []
    for q in pack.dashboard_queries():
        assert pack.metric_names(q.expr) <= known, (q.panel, pack.metric_names(q.expr) - known)
        if not prom.query(q.expr):
            no_data.append(f"{q.panel} {q.ref}")
    for sel in pack.variable_selectors():
        assert pack.metric_names(sel) <= known, sel
        if not prom.api("series", {"match[]": sel}):
            no_data.append(f"variable {sel}")
    assert not no_data, f"dashboard queries without data: {no_data}"

    # --- the dashboard as pictures ---------------------------------------------------------------
    out_dir = Path(os.environ.get("NODEAGENT_DASHBOARD_PNG_DIR") or tmp_path / "dashboard")
    files = render_dashboard(prom, started, time.time(), out_dir)
    report(capsys, f"dashboard panels rendered: {len(files)} PNGs in {out_dir}")
    assert len(files) == len(pack.panels()) + 1
    for f in files:
        assert 1000 < f.stat().st_size < 200_000, f


# --- rendering (matplotlib: the same queries Grafana would run) ----------------------------------
def legend(fmt: str, metric: dict[str, str]) -> str:
    text = re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: metric.get(m.group(1), ""), fmt) if fmt else ""
    return text or ",".join(f"{k}={v}" for k, v in metric.items() if k != "__name__") or "value"


def draw_panel(ax: Any, prom: Prometheus, panel: dict[str, Any], start: float, end: float) -> None:
    import matplotlib.dates as mdates

    queries = [q for q in pack.dashboard_queries({"panels": [panel], "templating": {"list": []}})]
    ax.set_title(panel["title"], fontsize=8)
    ax.tick_params(labelsize=6)
    step = max(1.0, (end - start) / 200)
    if panel["type"] == "table":
        rows = [
            (legend(q.legend, r["metric"]), float(r["value"][1])) for q in queries for r in prom.query(q.expr)
        ]
        rows.sort(key=lambda x: x[1])
        ax.barh([n[-40:] for n, _ in rows], [v for _, v in rows], color="tab:orange")
        ax.set_xlabel(panel["fieldConfig"]["defaults"].get("unit", ""), fontsize=6)
        return
    from datetime import datetime

    if panel["type"] == "heatmap":
        import numpy as np

        series = prom.query_range(queries[0].expr, start, end, step)
        les = sorted(series, key=lambda s: float(s["metric"]["le"]))
        times = [datetime.fromtimestamp(float(t)) for t, _ in les[0]["values"]] if les else []
        cum = np.array([[float(v) for _, v in s["values"]] for s in les]) if les else np.zeros((1, 1))
        per_bucket = np.diff(np.vstack([np.zeros((1, cum.shape[1])), cum]), axis=0)
        if times:
            x = mdates.date2num(times)
            ax.pcolormesh(x, range(len(les)), per_bucket, cmap="Oranges", shading="nearest")
        ax.set_yticks(range(len(les)), [s["metric"]["le"] for s in les], fontsize=5)
        ax.set_ylabel("le (s)", fontsize=6)
    else:
        for q in queries:
            for s in prom.query_range(q.expr, start, end, step):
                ts = [datetime.fromtimestamp(float(t)) for t, _ in s["values"]]
                label = legend(q.legend, s["metric"])[:40]
                style = "--" if re.search(r" (high|low)$", label) else "-"  # thresholds, as in Grafana
                ax.plot(ts, [float(v) for _, v in s["values"]], style, label=label, lw=1)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=5, loc="upper left")
        unit = panel["fieldConfig"]["defaults"].get("unit", "")
        ax.set_ylabel(unit, fontsize=6)
    ax.xaxis.set_major_locator(mdates.AutoDateLocator(maxticks=5))
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))


def render_dashboard(prom: Prometheus, start: float, end: float, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    files = []
    ps = pack.panels()
    for i, p in enumerate(ps, 1):
        fig, ax = plt.subplots(figsize=(6, 3), dpi=80)
        draw_panel(ax, prom, p, start, end)
        fig.tight_layout()
        path = out_dir / f"panel-{i:02d}-{re.sub(r'[^a-z0-9]+', '-', p['title'].lower()).strip('-')}.png"
        fig.savefig(path)
        plt.close(fig)
        files.append(path)
    cols = 4
    rows = (len(ps) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(16, 2.6 * rows), dpi=60)
    for ax, p in zip(axes.flat, ps, strict=False):
        draw_panel(ax, prom, p, start, end)
    for ax in list(axes.flat)[len(ps) :]:
        ax.axis("off")
    fig.suptitle("nodeagent dashboard queries on the sandbox node (matplotlib rendering)", fontsize=10)
    fig.tight_layout()
    overview = out_dir / "dashboard.png"
    fig.savefig(overview)
    plt.close(fig)
    files.append(overview)
    return files
