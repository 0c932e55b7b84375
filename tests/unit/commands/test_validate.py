"""``nodeagent validate``: exit codes and output, called in-process through ``nodeagent.cli.main``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main
from tests.unit.config.test_loader import HEAD, INVALID, REPO, _text


@pytest.mark.parametrize(("case_id", "body", "expected"), INVALID, ids=[i for i, _, _ in INVALID])
def test_invalid_config_exits_2_and_prints_every_problem(
    case_id: str, body: str | None, expected: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(_text(case_id, body))
    assert main(["validate", "-c", str(f)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    n = len(expected)
    assert err.splitlines() == [f"{f}: invalid, {n} problem{'' if n == 1 else 's'}:"] + [
        "  " + e.replace("<string>", str(f)) for e in expected
    ]


def test_valid_config_exits_0_and_lists_settings_that_differ_from_defaults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(
        HEAD + "kubelet:\n  registryPullQPS: 50\n  imageMaximumGCAge: 1h\n"
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        "        header:\n          Authorization: Bearer topsecret\n"
    )
    assert main(["validate", "-c", str(f)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.splitlines() == [
        f"{f}: OK, 3 settings differ from defaults:",
        "  kubelet.registryPullQPS: 50 (default: 10)",
        "  kubelet.imageMaximumGCAge: 1h (default: 0s)",
        "  containerd.mirrors: docker.io (1 mirror) (default: none)",
    ]
    assert "topsecret" not in out


def test_all_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(HEAD)
    assert main(["validate", "-c", str(f)]) == 0
    assert capsys.readouterr().out == f"{f}: OK, all defaults\n"


def test_design_sample_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-c", str(REPO / "tests/data/design-sample.yaml")]) == 0


def test_default_path_is_under_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(HEAD)
    assert main(["validate", "--root", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith(f"{cfg}: OK")


def test_missing_file_is_invalid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "--root", str(tmp_path)]) == 2
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    assert capsys.readouterr().err.splitlines() == [
        f"{cfg}: invalid, 1 problem:",
        f"  {cfg}: cannot read: No such file or directory",
    ]
