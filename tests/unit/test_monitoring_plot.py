"""bench/plot.py and bench/results.py: every chart draws from a result file of the documented
shape, a missing file is skipped, and the PNGs docs/ embeds exist and stay small."""

from __future__ import annotations

import re
from pathlib import Path

from bench import plot, results

REPO = Path(__file__).resolve().parents[2]

SAMPLES = {
    "mirrorhealth": {
        "image": "2 x 4 MiB",
        "stock_seconds": None,
        "stock_deadline_seconds": 60.0,
        "first_seconds": 5.0,
        "after_failover_seconds": [0.1, 0.12, 0.11],
        "no_mirror_seconds": [0.1, 0.1, 0.11],
    },
    "eviction_churn": {
        "filesystem_bytes": 200 << 20,
        "image_bytes": 20 << 20,
        "thresholds_percent": {"high": 60, "low": 40},
        "pulls": [
            {"n": n, "ok": n != 3, "seconds": 0.4, "used_bytes_after": (40 + 20 * (n % 2)) << 20}
            for n in range(1, 8)
        ],
        "evictions": 3,
    },
    "proxy": {"pairs_ms": {"ImageStatus": {"direct": [0.7, 0.8, 0.75], "proxied": [1.0, 1.1, 1.2]}}},
    "pod_pulls": {
        "runs": [
            {
                "label": "stock",
                "pulls": [
                    {"image": "a", "start_seconds": 0.0, "end_seconds": 2.0},
                    {"image": "b", "start_seconds": 2.0, "end_seconds": 4.0},
                ],
            },
            {
                "label": "nodeagent",
                "pulls": [
                    {"image": "a", "start_seconds": 0.0, "end_seconds": 2.0},
                    {"image": "b", "start_seconds": 0.1, "end_seconds": 2.1},
                ],
            },
        ]
    },
}


def test_every_chart_draws_a_small_png_from_its_result_file(tmp_path: Path) -> None:
    for name, data in SAMPLES.items():
        results.write(name, data, results_dir=tmp_path / "results")
        assert results.read(name, tmp_path / "results")["benchmark"] == name  # type: ignore[index]
    made = plot.plot_all(tmp_path / "results", tmp_path / "img")
    assert set(made) == set(SAMPLES)
    for name, path in made.items():
        assert path is not None and path.name == f"bench-{name.replace('_', '-')}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert 5_000 < path.stat().st_size < 200_000, (name, path.stat().st_size)


def test_a_missing_result_file_is_skipped(tmp_path: Path) -> None:
    results.write("mirrorhealth", SAMPLES["mirrorhealth"], results_dir=tmp_path)
    made = plot.plot_all(tmp_path, tmp_path / "img")
    assert made["mirrorhealth"] is not None and made["proxy"] is None and made["pod_pulls"] is None
    assert plot.main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "img2")]) == 1


def test_images_docs_embed_exist_and_are_small() -> None:
    embedded = set()
    for md in (REPO / "docs").glob("*.md"):
        embedded |= {REPO / "docs" / m for m in re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md.read_text())}
    assert embedded, "docs embed no picture"
    for png in embedded:
        assert png.exists(), png
        assert png.stat().st_size < 200_000, png
