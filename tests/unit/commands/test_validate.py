"""``nodeagent validate``: exit codes and output, called in-process through ``nodeagent.cli.main``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main
from nodeagent.eks.userdata import render_al2023
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


def test_missing_file_is_invalid_and_points_at_the_example(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a new user's first `nodeagent validate`: no file yet, so say where to start
    assert main(["validate", "--root", str(tmp_path)]) == 2
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    assert capsys.readouterr().err.splitlines() == [
        f"{cfg}: invalid, 1 problem:",
        f"  {cfg}: cannot read: No such file or directory",
        f"  no config at {cfg}: start from docs/config.example.yaml (every key, commented) or pass -c FILE",
    ]
    assert (REPO / "docs/config.example.yaml").is_file()


def test_one_setting_that_differs_is_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(HEAD + "kubelet:\n  registryPullQPS: 50\n")
    assert main(["validate", "-c", str(f)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{f}: OK, 1 setting differs from its default:",
        "  kubelet.registryPullQPS: 50 (default: 10)",
    ]


def test_warns_as_apply_does_when_eviction_cannot_act_before_the_kubelet_gc(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(HEAD + "eviction:\n  highThresholdPercent: 90\n  lowThresholdPercent: 80\n")
    assert main(["validate", "-c", str(f)]) == 0
    err = capsys.readouterr().err
    assert err.startswith(
        "warning: eviction.highThresholdPercent (90) is not below kubelet.imageGCHighThresholdPercent (85)"
    )
    from nodeagent.config import load
    from nodeagent.config.warnings import config_warnings

    assert err.splitlines() == [f"warning: {w}" for w in config_warnings(load(f))]  # apply's list


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


def test_nodeagent_imds_env_is_honoured_as_the_help_says(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = _root(tmp_path)
    monkeypatch.setenv("NODEAGENT_IMDS", "on")
    with FakeImds(render_al2023(PART).encode()) as fake:
        monkeypatch.setenv("NODEAGENT_IMDS_ENDPOINT", fake.endpoint)
        assert main(["validate", "--root", str(root)]) == 0
        assert fake.requests != []
    cfg = root / "etc/nodeagent/config.yaml"
    assert capsys.readouterr().out.startswith(f"{cfg} + imds:user-data: OK, 2 settings differ")


def test_without_imds_flag_imds_is_not_asked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _root(tmp_path)
    with FakeImds(render_al2023(PART).encode()) as fake:
        assert main(["validate", "--root", str(root), "--imds-endpoint", fake.endpoint]) == 0
        assert fake.requests == []
    assert "registryPullQPS" not in capsys.readouterr().out
