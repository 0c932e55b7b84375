import json
from pathlib import Path

import pytest

from nodeagent.cli import main
from tests.unit.targets.helpers import DATA, HEADER


def _root(tmp_path: Path, body: str = "containerd:\n  restartCommand: []\n") -> Path:
    (tmp_path / "etc/nodeagent").mkdir(parents=True)
    (tmp_path / "etc/nodeagent/config.yaml").write_text(HEADER + body)
    (tmp_path / "etc/containerd").mkdir(parents=True)
    (tmp_path / "etc/containerd/config.toml").write_text(
        (DATA / "containerd-1.6-config-default.toml").read_text()
    )
    return tmp_path


def test_exit_0_and_prints_tuning_and_changes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(
        tmp_path, "containerd:\n  restartCommand: []\n  mirrors:\n    q.io:\n      - endpoint: https://m\n"
    )
    # restartCommand [] never restarts: apply says containerd needs one
    assert main(["apply", "--root", str(root), "--flavor", "generic"]) == 0
    out = capsys.readouterr()
    assert "tuning: kubelet.maxParallelImagePulls = " in out.out
    # no containerd binary in the tree: the CRI table, said as a note, and a warning
    assert "note: containerd download concurrency goes to plugins.io.containerd.grpc.v1.cri: " in out.out
    assert "containerd version unknown" in out.err
    assert "changed: " in out.out and "restartCommand is empty" in out.err
    report = json.loads((root / "var/lib/nodeagent/apply-report.json").read_text())
    assert any(n.startswith("containerd download concurrency goes to") for n in report["notes"])
    # nothing changed the second time: no restart needed, exit 0
    assert main(["apply", "--root", str(root), "--flavor", "generic"]) == 0
    assert "nothing to change" in capsys.readouterr().out


def test_exit_0_on_eks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    assert main(["apply", "--root", str(root), "--flavor", "eks-al2023"]) == 0
    assert "changed: " + str(root / "etc/eks/nodeadm.d/90-nodeagent.yaml") in capsys.readouterr().out


def test_exit_2_on_invalid_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path, "kubelet:\n  imageGCHighThresholdPercent: 500\n")
    assert main(["apply", "--root", str(root)]) == 2
    assert "kubelet.imageGCHighThresholdPercent" in capsys.readouterr().err
    assert not (root / "var/lib/nodeagent").exists()


def test_exit_1_on_unusable_containerd_config(tmp_path: Path) -> None:
    root = _root(tmp_path)
    (root / "etc/containerd/config.toml").write_text("version = 2\n[[broken")
    assert main(["apply", "--root", str(root), "--flavor", "generic"]) == 1


def test_dry_run_writes_nothing_not_even_the_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    assert main(["apply", "--root", str(root), "--flavor", "generic", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would change: " in out and "--- " in out
    assert not (root / "var").exists() and not (root / "etc/kubernetes").exists()
