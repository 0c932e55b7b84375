"""PNG charts of the latest benchmark results (``python -m bench --plot``), for docs/.

Reads ``bench/results/<name>.json`` (bench/results.py) and writes ``docs/img/bench-<name>.png``
(small: 100 dpi, well under 200 KB). A chart whose result file is missing is skipped and said so.
Charts and the fields they read:

- ``mirrorhealth`` (bench_mirrorhealth.py): ``stock_seconds`` (null: cancelled at
  ``stock_deadline_seconds``), ``first_seconds``, ``after_failover_seconds`` and
  ``no_mirror_seconds`` (lists): the first pull with a hung mirror, stock vs nodeagent.
- ``eviction_churn`` (bench_eviction_churn.py): ``pulls`` (``seconds``, ``used_bytes_after``,
  ``ok``), ``filesystem_bytes``, ``thresholds_percent``: image filesystem usage over the churn.
- ``proxy`` (bench_proxy.py, when it writes one): ``pairs_ms`` = {call: {"direct": [...],
  "proxied": [...]}}, interleaved pairs: the distribution of the time the proxy adds.
- ``pod_pulls`` (bench_pod_pulls.py): ``runs`` = [{"label", "pulls": [{"image", "start_seconds",
  "end_seconds"} (seconds from pod creation)]}]: a pull timeline per run.

    python -m bench --plot               # every chart whose results exist
    python -m bench.plot --out DIR       # elsewhere
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import results

DOCS_IMG = Path(__file__).resolve().parent.parent / "docs" / "img"
DPI = 100


def _figure(width: float = 7.0, height: float = 3.2, rows: int = 0) -> tuple[Any, Any]:
    """One axes, or (``rows`` > 0) a column of them as a 2-D array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if rows:
        return plt.subplots(rows, 1, figsize=(width, height), dpi=DPI, squeeze=False)
    return plt.subplots(figsize=(width, height), dpi=DPI)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    fig.tight_layout(rect=(0, 0.03, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _stamp(fig: Any, data: dict[str, Any]) -> None:
    host = data.get("host", {})
    fig.text(
        0.995,
        0.005,
        f"{data.get('finished_at', '')}, {host.get('cpus', '?')} CPUs",
        ha="right",
        va="bottom",
        fontsize=7,
        color="grey",
    )


def plot_mirrorhealth(data: dict[str, Any], path: Path) -> Path:
    fig, ax = _figure()
    deadline = float(data["stock_deadline_seconds"])
    stock = data.get("stock_seconds")
    after, none = data["after_failover_seconds"], data["no_mirror_seconds"]
    labels = [
        "stock containerd",
        "nodeagent, first pull",
        "nodeagent, after fail-over (median)",
        "no mirror configured (median)",
    ]
    values = [stock if stock is not None else deadline, data["first_seconds"], statistics.median(after),
              statistics.median(none)]  # fmt: skip
    colors = ["tab:red", "tab:blue", "tab:blue", "tab:grey"]
    y = list(range(len(labels)))[::-1]
    bars = ax.barh(y, values, color=colors)
    if stock is None:
        bars[0].set_hatch("//")
        bars[0].set_alpha(0.6)
    for yi, pts in ((y[2], after), (y[3], none)):
        ax.plot(pts, [yi] * len(pts), "k|", ms=10)
    right = [values[0], values[1], max([values[2], *after]), max([values[3], *none])]
    for yi, v, r, b in zip(y, values, right, bars, strict=True):
        text = f">{deadline:g} s (cancelled)" if b is bars[0] and stock is None else f"{v:.2f} s"
        ax.text(r * 1.2, yi, text, va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(min(values) / 2, deadline * 8)
    ax.set_xlabel("pull time, seconds (log scale)", fontsize=8)
    ax.set_title(
        f"Pull of a {data.get('image', '')} image with a hung mirror first in hosts.toml", fontsize=9
    )
    _stamp(fig, data)
    return _save(fig, path)


def plot_eviction_churn(data: dict[str, Any], path: Path) -> Path:
    fig, ax = _figure()
    total = float(data["filesystem_bytes"])
    t, used, failed_t, failed_used = 0.0, [], [], []
    times = []
    for p in data["pulls"]:
        t += float(p["seconds"])
        times.append(t)
        used.append(100 * p["used_bytes_after"] / total)
        if not p["ok"]:
            failed_t.append(t)
            failed_used.append(used[-1])
    ax.plot(times, used, "o-", ms=3, lw=1, label="usage after each pull")
    if failed_t:
        ax.plot(failed_t, failed_used, "rx", label="failed pull")
    th = data["thresholds_percent"]
    ax.axhline(th["high"], color="tab:red", ls="--", lw=1, label=f"eviction high ({th['high']} %)")
    ax.axhline(th["low"], color="tab:green", ls="--", lw=1, label=f"eviction low ({th['low']} %)")
    ax.set_ylim(0, 100)
    ax.set_ylabel("image filesystem used, %", fontsize=8)
    ax.set_xlabel("seconds (pulls back to back)", fontsize=8)
    ok = sum(1 for p in data["pulls"] if p["ok"])
    ax.set_title(
        f"Eviction under churn: {ok}/{len(data['pulls'])} pulls of {data['image_bytes'] >> 20} MiB images "
        f"on a {total / 1e6:.0f} MB disk, {data['evictions']} evictions",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="lower right")
    _stamp(fig, data)
    return _save(fig, path)


def plot_proxy(data: dict[str, Any], path: Path) -> Path:
    pairs = data["pairs_ms"]
    fig, axes = _figure(7.0, 1.2 + 1.6 * len(pairs), rows=len(pairs))
    for ax, (call, d) in zip(axes[:, 0], pairs.items(), strict=True):
        added = [p - q for p, q in zip(d["proxied"], d["direct"], strict=True)]
        ax.hist(added, bins=60, color="tab:blue")
        med = statistics.median(added)
        ax.axvline(med, color="k", lw=1)
        ax.set_title(
            f"{call}: time added by the proxy, median {med:+.2f} ms over {len(added)} pairs", fontsize=9
        )
        ax.set_xlabel("ms (proxied - direct, interleaved pairs)", fontsize=8)
    _stamp(fig, data)
    return _save(fig, path)


def plot_pod_pulls(data: dict[str, Any], path: Path) -> Path:
    runs = data["runs"]
    fig, ax = _figure(7.0, 1.0 + 0.35 * sum(len(r["pulls"]) for r in runs))
    y, ticks = 0, []
    for i, run in enumerate(runs):
        label = run["label"]
        for p in sorted(run["pulls"], key=lambda p: p["start_seconds"]):
            ax.barh(y, p["end_seconds"] - p["start_seconds"], left=p["start_seconds"], color=f"C{i}")
            ticks.append((y, f"{label}: {p['image']}"[-50:]))
            y += 1
    ax.set_yticks([t for t, _ in ticks], [n for _, n in ticks], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds from pod creation", fontsize=8)
    ax.set_title("Image pulls of one multi-image pod", fontsize=9)
    _stamp(fig, data)
    return _save(fig, path)


CHARTS: dict[str, Callable[[dict[str, Any], Path], Path]] = {
    "mirrorhealth": plot_mirrorhealth,
    "eviction_churn": plot_eviction_churn,
    "proxy": plot_proxy,
    "pod_pulls": plot_pod_pulls,
}


def plot_all(results_dir: Path | None = None, out_dir: Path = DOCS_IMG) -> dict[str, Path | None]:
    made: dict[str, Path | None] = {}
    for name, chart in CHARTS.items():
        data = results.read(name, results_dir)
        if data is None:
            print(f"plot: {name}: no results (run: python -m bench {name})")
            made[name] = None
            continue
        path = chart(data, out_dir / f"bench-{name.replace('_', '-')}.png")
        print(f"plot: {name}: {path} ({path.stat().st_size // 1024} KB)")
        made[name] = path
    return made


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description="PNG charts of the latest benchmark results")
    ap.add_argument("--results", type=Path, default=None, help="results dir (default bench/results)")
    ap.add_argument("--out", type=Path, default=DOCS_IMG, help="where the PNGs go (default docs/img)")
    args = ap.parse_args(argv)
    made = plot_all(args.results, args.out)
    return 0 if any(made.values()) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
