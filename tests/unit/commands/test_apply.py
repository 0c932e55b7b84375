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


# --- mirrors in a dry run: offline mode, and a header naming what was left out (first-use friction) --
MIRRORED = (
    "containerd:\n  restartCommand: []\n  mirrors:\n    docker.io:\n"
    "      - endpoint: http://127.0.0.1:1\n"  # nothing listens on port 1: a probe fails at once
    "      - endpoint: https://ecr.example.com\n"
    "        credentials: {from: file, path: /etc/nodeagent/mirror-creds}\n"
)


def test_dry_run_header_names_the_mirrors_left_out_and_why(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path, MIRRORED)
    assert main(["apply", "--root", str(root), "--flavor", "generic", "--dry-run"]) == 0
    out = capsys.readouterr().out
    header = out.split("\n--- ", 1)[0].splitlines()
    assert (
        header[0]
        == "# mirrors: each mirror probed once now; what is left out of the hosts.toml diffs below, and why:"
    )
    assert header[1].startswith(
        "#   containerd.mirrors.docker.io[1]: https://ecr.example.com: credentials unavailable ("
    )
    assert header[2].startswith(
        "#   containerd.mirrors.docker.io[0]: http://127.0.0.1:1 not answering at apply time ("
    )
    assert "127.0.0.1:1" not in out.split("\n--- ", 1)[1]  # and indeed not in the diff


def test_offline_dry_run_probes_nothing_and_writes_every_mirror_without_credentials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import nodeagent.mirrorhealth.applycheck as applycheck

    def no_probe(*_: object) -> None:
        raise AssertionError("--offline must not probe")

    monkeypatch.setattr(applycheck, "probe_all_once", no_probe)
    root = _root(tmp_path, MIRRORED)
    assert main(["apply", "--root", str(root), "--flavor", "generic", "--dry-run", "--offline"]) == 0
    out = capsys.readouterr().out
    header, diffs = out.split("\n--- ", 1)
    assert header.splitlines() == [
        "# mirrors: --offline: no mirror probed, no credentials fetched; what is left out of the hosts.toml "
        "diffs below, and why:",
        "#   containerd.mirrors.docker.io[1]: https://ecr.example.com: credentials unavailable "
        "(--offline: not fetched); left out of hosts.toml until nodeagent run gets them",
    ]
    assert '[host."http://127.0.0.1:1"]' in diffs and "ecr.example.com" not in diffs
