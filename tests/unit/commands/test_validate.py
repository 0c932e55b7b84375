"""``nodeagent validate``: exit codes and output, called in-process through ``nodeagent.cli.main``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.userdata import render_al2023
from tests.fakes.imds import FakeImds
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


# --- --imds: the user-data part merged over the file (FAKE IMDSv2 on loopback, threads only) --------
PART = HEAD + "kubelet:\n  registryPullQPS: 50\n"


def _root(tmp_path: Path) -> Path:
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(HEAD + "kubelet:\n  registryBurst: 30\n")
    return tmp_path


def test_imds_on_validates_the_merge_with_the_user_data_part(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    with FakeImds(render_al2023(PART).encode()) as fake:
        rc = main(["validate", "--root", str(root), "--imds", "on", "--imds-endpoint", fake.endpoint])
    assert rc == 0
    cfg = root / "etc/nodeagent/config.yaml"
    assert capsys.readouterr().out.splitlines() == [
        f"{cfg} + imds:user-data: OK, 2 settings differ from defaults:",
        "  kubelet.registryPullQPS: 50 (default: 10)",
        "  kubelet.registryBurst: 30 (default: 20)",
    ]


def test_imds_on_with_an_invalid_user_data_part_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _root(tmp_path)
    bad = HEAD + "kubelet:\n  registryPullQPS: lots\n"
    with FakeImds(render_al2023(bad).encode()) as fake:
        rc = main(["validate", "--root", str(root), "--imds", "on", "--imds-endpoint", fake.endpoint])
    assert rc == 2
    cfg = root / "etc/nodeagent/config.yaml"
    assert capsys.readouterr().err.splitlines() == [
        f"{cfg} + imds:user-data: invalid, 1 problem:",
        "  user-data part 1 (application/nodeagent.yaml): kubelet.registryPullQPS: expected an integer, "
        "got a string 'lots' (line 4)",
    ]


def test_without_imds_flag_imds_is_not_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    with FakeImds(render_al2023(PART).encode()) as fake:
        assert main(["validate", "--root", str(root), "--imds-endpoint", fake.endpoint]) == 0
        assert fake.requests == []
    assert "registryPullQPS" not in capsys.readouterr().out
