"""``nodeagent prefetch`` command: argument and config handling (the pulls themselves are covered in
tests/unit/test_prefetch.py and, against real containerd, tests/integration/test_prefetch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.cli import main


def test_invalid_config_exits_2_and_names_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODEAGENT_IMDS", "off")
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True)
    cfg.write_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\nimages:\n  prefetchConcurrency: 0\n"
    )
    assert main(["prefetch", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "images.prefetchConcurrency: must be between 1 and 64, got 0 (line 4)" in err
    assert not (tmp_path / "etc/nodeagent/baked-images.json").exists()


def test_nothing_to_prefetch_exits_0_without_touching_the_runtime(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NODEAGENT_IMDS", "off")
    cfg = tmp_path / "etc/nodeagent/config.yaml"
    cfg.parent.mkdir(parents=True)
    # An endpoint nobody listens on: with no images, prefetch must not even try it.
    cfg.write_text(
        "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"
        f"cri:\n  endpoint: unix://{tmp_path}/nothing.sock\n"
    )
    assert main(["prefetch", "--root", str(tmp_path)]) == 0
    assert "prefetch: 0 image(s)" in capsys.readouterr().out
