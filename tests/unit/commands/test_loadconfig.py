"""One loading path and one "invalid config" report for every command that reads the config."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main
from tests.unit.config.test_loader import HEAD

COMMANDS = [
    ["validate"],
    ["apply", "--dry-run"],
    ["prefetch"],
    ["run"],
    ["evict", "--dry-run"],
    ["userdata", "--format", "al2023"],
]


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_reports_an_invalid_config_the_same_way(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "config.yaml"
    f.write_text(HEAD + "kubelet:\n  registryPullQps: 5\n  registryBurst: -1\n")
    assert main([*argv, "-c", str(f), "--root", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        f"{f}: invalid, 2 problems:",
        "  kubelet.registryPullQps: unknown key (did you mean 'registryPullQPS'?) (line 4)",
        "  kubelet.registryBurst: must be between 0 and 2147483647, got -1 (line 5)",
    ]


@pytest.mark.parametrize("argv", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_command_but_userdata_reads_nodeagent_imds(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # a bad $NODEAGENT_IMDS is a problem of every command that may merge user-data; userdata never does
    f = tmp_path / "config.yaml"
    f.write_text(HEAD)
    monkeypatch.setenv("NODEAGENT_IMDS", "maybe")
    rc = main([*argv, "-c", str(f), "--root", str(tmp_path)])
    err = capsys.readouterr().err
    if argv[0] == "userdata":  # publishes the file alone
        assert rc == 0 and "NODEAGENT_IMDS" not in err
    else:
        assert rc == 2
        assert err.splitlines() == [
            f"{f}: invalid, 1 problem:",
            "  NODEAGENT_IMDS: must be on, off or auto, not 'maybe'",
        ]


def test_evict_without_dry_run_says_why_only_dry_run_exists(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evict", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "the following arguments are required" not in err
    assert err == (
        "nodeagent evict: only --dry-run is supported: the daemon (nodeagent run) removes images when the "
        "image filesystem passes eviction.highThresholdPercent; 'nodeagent evict --dry-run' shows what it "
        "would remove now, and why\n"
    )


def test_flavor_has_help_text(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["apply", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--flavor {auto,eks-al2023,generic} what to write: eks-al2023 a nodeadm NodeConfig drop-in" in text
