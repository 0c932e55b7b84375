"""nodeagent status: health from the daemon status file and the apply report (files only)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nodeagent.commands import status as status_cmd
from nodeagent.run.status import collect, render
from nodeagent.run.statusfile import (
    VERSION,
    CacheStatus,
    DaemonStatus,
    MetricsStatus,
    ProxyStatus,
    PullsStatus,
    RecentPull,
    Section,
    WorkerStatus,
)
from nodeagent.util.paths import Paths

NOW = 1_800_000_000.0


def unused_pid() -> int:
    import psutil

    pid = max(psutil.pids()) + 1000
    while psutil.pid_exists(pid):
        pid += 1000
    return pid


def daemon_status(**over: Any) -> DaemonStatus:
    """A status as the daemon writes it (the shared model, nodeagent/statusfile.py)."""
    st = DaemonStatus(
        version=VERSION,
        nodeagent_version="0.1.0",
        state="running",
        pid=os.getpid(),
        started_at=NOW - 600,
        updated_at=NOW - 2,
        heartbeat_seconds=5.0,
        proxy=ProxyStatus(
            socket="/run/nodeagent/cri.sock",
            socket_inherited=False,
            upstream="unix:///run/containerd/containerd.sock",
            upstream_ok=True,
            upstream_error="",
            upstream_checked_at=NOW - 4,
        ),
        metrics=MetricsStatus(listen="0.0.0.0:9847"),
        pulls=PullsStatus(
            at=NOW - 2,
            in_flight=1,
            totals={"success": 3, "not_found": 1},
            recent=[
                RecentPull(
                    image="reg.local/app:1",
                    registry="reg.local",
                    result="success",
                    duration=1.5,
                    started_at=NOW - 30,
                    bytes=3 << 20,
                )
            ],
        ),
        cache=CacheStatus(
            at=NOW - 20,
            images=12,
            bytes=5 << 30,
            imagefs_used_ratio=0.613,
            imagefs_path="/var/lib/containerd",
            source="daemon",
        ),
        workers={},
        sections={
            "eviction": Section(
                at=NOW - 7, fields={"recent": [{"image": "old:1", "reason": "high_threshold"}]}
            )
        },
    )
    return dataclasses.replace(st, **over)


def daemon_doc(**over: Any) -> dict[str, Any]:
    return daemon_status(**over).to_json()


def write(
    paths: Paths, daemon: dict[str, Any] | str | None = None, apply: dict[str, Any] | None = None
) -> None:
    if daemon is not None:
        paths.daemon_status_file.parent.mkdir(parents=True, exist_ok=True)
        paths.daemon_status_file.write_text(daemon if isinstance(daemon, str) else json.dumps(daemon))
    if apply is not None:
        paths.apply_report_file.parent.mkdir(parents=True, exist_ok=True)
        paths.apply_report_file.write_text(json.dumps(apply))


APPLY_OK = {
    "result": "ok",
    "flavor": "generic",
    "changed": ["/etc/containerd/config.toml"],
    "warnings": ["containerd.mirrors.docker.io[0]: not answering"],
    "errors": [],
}


def test_healthy_node(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    write(paths, daemon_doc(), APPLY_OK)
    r = collect(paths, now=NOW)
    assert not r.degraded, r.problems
    text = render(r)
    assert f"running (pid {os.getpid()}" in text
    assert "answering" in text
    assert "12 images, 5.0 GiB; imagefs 61% used (/var/lib/containerd); measured 20s ago" in text
    assert "unix:///run/containerd/containerd.sock: answering (checked 4s ago)" in text
    assert "eviction (as of 7s ago)" in text
    assert "reg.local/app:1" in text and "success" in text and "3.0 MiB" in text
    assert "not_found 1, success 3" in text
    assert "eviction" in text and "high_threshold" in text
    assert "warning: containerd.mirrors.docker.io[0]: not answering" in text
    assert "proxy socket   /run/nodeagent/cri.sock\n" in text  # bound by the daemon itself
    assert text.rstrip().endswith("healthy")


def test_socket_passed_by_systemd_is_named(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    doc = daemon_status()
    doc.proxy.socket_inherited = True
    write(paths, doc.to_json(), APPLY_OK)
    text = render(collect(paths, now=NOW))
    assert "proxy socket   /run/nodeagent/cri.sock (from systemd: nodeagent.socket)\n" in text


@pytest.mark.parametrize(
    ("daemon", "apply", "problem"),
    [
        (None, APPLY_OK, "daemon: no status"),
        ("{not json", APPLY_OK, "not valid JSON"),
        (daemon_doc(updated_at=NOW - 120), APPLY_OK, "stale"),
        (daemon_doc(state="stopped"), APPLY_OK, "daemon: stopped"),
        (
            daemon_doc(
                proxy=ProxyStatus("", False, "unix:///x.sock", False, "UNAVAILABLE", NOW - 3),
            ),
            APPLY_OK,
            "upstream CRI unix:///x.sock not answering: UNAVAILABLE",
        ),
        (
            daemon_doc(),
            {**APPLY_OK, "result": "failed", "errors": ["kubelet: write failed"]},
            "apply: kubelet",
        ),
        (daemon_doc(sections={"mirrors": Section(at=NOW, degraded=True)}), APPLY_OK, "mirrors: degraded"),
        (
            daemon_doc(sections={"podPulls": Section(at=NOW, error="kubeconfig: bad")}),
            APPLY_OK,
            "podPulls: kubeconfig",
        ),
        (daemon_doc(pid=unused_pid()), APPLY_OK, "is gone"),
        (daemon_doc(started_at=0.0), APPLY_OK, "newer process"),
    ],
)
def test_degraded(tmp_path: Path, daemon: Any, apply: dict[str, Any], problem: str) -> None:
    paths = Paths(tmp_path)
    write(paths, daemon, apply)
    r = collect(paths, now=NOW)
    assert r.degraded
    assert any(problem in p for p in r.problems), r.problems
    assert "DEGRADED" in render(r)


def test_command_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = Paths(tmp_path)
    write(paths, daemon_doc(updated_at=1.0), APPLY_OK)  # 1970: stale by any clock
    args = argparse.Namespace(root=str(tmp_path), json=True, config=None)
    assert status_cmd.run(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] is False and out["daemon"]["pid"] == os.getpid()
    assert out["apply"]["flavor"] == "generic"


def test_command_healthy_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodeagent.run.status as st

    paths = Paths(tmp_path)
    write(paths, daemon_doc(), None)  # no apply report yet is not a problem by itself
    monkeypatch.setattr(st.time, "time", lambda: NOW)
    args = argparse.Namespace(root=str(tmp_path), json=False, config=None)
    assert status_cmd.run(args) == 0
    assert "last apply     none" in capsys.readouterr().out


def test_section_summary_lines_replace_the_generic_dump(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    sections = {
        "mirrorHealth": Section(at=NOW, summary=["docker.io  http://m:5000  UP"], fields={"mirrors": [1]})
    }
    write(paths, daemon_doc(sections=sections), APPLY_OK)
    text = render(collect(paths, now=NOW))
    assert "  docker.io  http://m:5000  UP" in text
    assert "mirrors: 1" not in text


def test_status_names_the_snapshotter_and_pull_mode(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    write(paths, daemon_doc(), {**APPLY_OK, "snapshotter": "soci", "pull_mode": "parallel"})
    assert "snapshotter    soci (pull mode parallel)" in render(collect(paths, now=NOW))
    write(paths, daemon_doc(), {**APPLY_OK, "snapshotter": "overlayfs", "pull_mode": ""})
    text = render(collect(paths, now=NOW))
    assert "snapshotter    overlayfs\n" in text


def test_cache_not_measured_yet_is_said(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    write(paths, daemon_doc(cache=None), APPLY_OK)
    r = collect(paths, now=NOW)
    assert not r.degraded
    assert "image cache    not measured yet\n" in render(r)


def test_a_crashing_worker_is_shown(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    workers = {"eviction": WorkerStatus("restarting", 2, "RuntimeError: boom", NOW - 65)}
    write(paths, daemon_doc(workers=workers), APPLY_OK)
    text = render(collect(paths, now=NOW))
    assert "worker eviction restarting since 1m ago, 2 restarts; last error: RuntimeError: boom" in text


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d.update(version=1),
            "version 1 (written by nodeagent 0.1.0); this nodeagent reads version 2",
        ),
        (
            lambda d: d["proxy"].update(upstreamOk="yes"),
            "status.json.proxy.upstreamOk: expected bool, got str",
        ),
        (lambda d: d["cache"].pop("at"), "status.json.cache.at: missing"),
        (lambda d: d["pulls"]["recent"][0].update(duration=None), "pulls.recent[0].duration: expected float"),
        (lambda d: d.update(state="sleeping"), "state: 'sleeping' is not one of running, stopped"),
        (lambda d: d["sections"]["eviction"].update(at="soon"), "sections.eviction.at: expected float"),
    ],
)
def test_an_unreadable_status_file_names_the_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], message: str
) -> None:
    paths = Paths(tmp_path)
    doc = daemon_doc()
    change(doc)
    write(paths, doc, APPLY_OK)
    r = collect(paths, now=NOW)
    assert r.degraded and r.daemon is None
    assert message in (r.daemon_error or ""), r.daemon_error
    assert str(paths.daemon_status_file) in (r.daemon_error or "")


def test_the_model_reads_back_what_it_writes() -> None:
    st = daemon_status(workers={"w": WorkerStatus("running", 0, None, NOW)})
    again = DaemonStatus.from_json(json.loads(st.dumps()))
    assert again == st
    doc = st.to_json()
    # the JSON keys others rely on (tests/sandbox, bench, docs/proxy.md)
    assert doc["proxy"]["socketInherited"] is False and doc["metrics"]["listen"] == "0.0.0.0:9847"
    assert doc["pulls"]["recent"][0]["started_at"] == NOW - 30  # a pull record keeps its log keys
    assert doc["sections"]["eviction"]["recent"][0]["image"] == "old:1"  # a section stays flat
    assert doc["cache"]["imagefsUsedRatio"] == 0.613
