import pytest

from nodeagent.cli import build_parser, main

COMMANDS = ["validate", "apply", "prefetch", "run", "evict", "status", "userdata", "taint-remover"]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_every_command_has_help(cmd: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: nodeagent " + cmd in capsys.readouterr().out


def test_all_design_commands_present() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert sorted(sub.choices) == sorted(COMMANDS)  # type: ignore[arg-type]


def test_status_takes_no_config_it_would_ignore() -> None:
    # status reads files only (the daemon's status file, the apply report): no -c, no --imds
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["status", "-c", "/x.yaml"])
    assert e.value.code == 2
    assert build_parser().parse_args(["status", "--json", "--root", "/r"]).json


def test_taint_remover_refuses_a_bad_max_wait(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["taint-remover", "--max-wait=soon"]) == 1
    assert "--max-wait: 'soon' is not a duration" in capsys.readouterr().err
