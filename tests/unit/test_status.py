"""nodeagent status: health from the daemon status file and the apply report (files only)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import pytest

from nodeagent.commands import status as status_cmd
from nodeagent.paths import Paths
from nodeagent.status import collect, render

NOW = 1_800_000_000.0


def unused_pid() -> int:
    import psutil

    pid = max(psutil.pids()) + 1000
    while psutil.pid_exists(pid):
        pid += 1000
    return pid


def daemon_doc(**over: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "nodeagentVersion": "0.1.0",
        "state": "running",
        "pid": os.getpid(),
        "startedAt": NOW - 600,
        "updatedAt": NOW - 2,
        "heartbeatSeconds": 5.0,
        "proxy": {
            "socket": "/run/nodeagent/cri.sock",
            "upstream": "unix:///run/containerd/containerd.sock",
            "upstreamOk": True,
            "upstreamError": "",
        },
        "metrics": {"listen": "0.0.0.0:9847"},
        "pulls": {
            "inFlight": 1,
            "totals": {"success": 3, "not_found": 1},
            "recent": [
                {
                    "image": "reg.local/app:1",
                    "result": "success",
                    "duration": 1.5,
                    "bytes": 3 << 20,
                    "started_at": NOW - 30,
                },
            ],
        },
        "cache": {
            "images": 12,
            "bytes": 5 << 30,
            "imagefsUsedRatio": 0.613,
            "imagefsPath": "/var/lib/containerd",
        },
        "workers": {},
        "sections": {"eviction": {"recent": [{"image": "old:1", "reason": "high_threshold"}]}},
    }
    doc.update(over)
    return doc


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
    assert "12 images, 5.0 GiB; imagefs 61% used" in text
    assert "reg.local/app:1" in text and "success" in text and "3.0 MiB" in text
    assert "not_found 1, success 3" in text
    assert "eviction" in text and "high_threshold" in text
    assert "warning: containerd.mirrors.docker.io[0]: not answering" in text
    assert "proxy socket   /run/nodeagent/cri.sock\n" in text  # bound by the daemon itself
    assert text.rstrip().endswith("healthy")


def test_socket_passed_by_systemd_is_named(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    doc = daemon_doc()
    doc["proxy"]["socketInherited"] = True
    write(paths, doc, APPLY_OK)
    text = render(collect(paths, now=NOW))
    assert "proxy socket   /run/nodeagent/cri.sock (from systemd: nodeagent.socket)\n" in text


@pytest.mark.parametrize(
    ("daemon", "apply", "problem"),
    [
        (None, APPLY_OK, "daemon: no status"),
        ("{not json", APPLY_OK, "not valid JSON"),
        (daemon_doc(updatedAt=NOW - 120), APPLY_OK, "stale"),
        (daemon_doc(state="stopped"), APPLY_OK, "daemon: stopped"),
        (
            daemon_doc(
                proxy={"upstream": "unix:///x.sock", "upstreamOk": False, "upstreamError": "UNAVAILABLE"}
            ),
            APPLY_OK,
            "upstream CRI unix:///x.sock not answering",
        ),
        (
            daemon_doc(),
            {**APPLY_OK, "result": "failed", "errors": ["kubelet: write failed"]},
            "apply: kubelet",
        ),
        (daemon_doc(sections={"mirrors": {"degraded": True}}), APPLY_OK, "mirrors: degraded"),
        (daemon_doc(pid=unused_pid()), APPLY_OK, "is gone"),
        (daemon_doc(startedAt=0.0), APPLY_OK, "newer process"),
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
    write(paths, daemon_doc(updatedAt=None), APPLY_OK)
    args = argparse.Namespace(root=str(tmp_path), json=True, config=None)
    assert status_cmd.run(args) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["healthy"] is False and out["daemon"]["pid"] == os.getpid()
    assert out["apply"]["flavor"] == "generic"


def test_command_healthy_exit_zero(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodeagent.status as st

    paths = Paths(tmp_path)
    write(paths, daemon_doc(), None)  # no apply report yet is not a problem by itself
    monkeypatch.setattr(st.time, "time", lambda: NOW)
    args = argparse.Namespace(root=str(tmp_path), json=False, config=None)
    assert status_cmd.run(args) == 0
    assert "last apply     none" in capsys.readouterr().out


def test_section_summary_lines_replace_the_generic_dump(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    sections = {
        "mirrorHealth": {"degraded": False, "summary": ["docker.io  http://m:5000  UP"], "mirrors": [1]}
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
