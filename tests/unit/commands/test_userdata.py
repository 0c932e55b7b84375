"""``nodeagent userdata``: validates the config first, then prints al2023 MIME or Karpenter objects."""

from __future__ import annotations

import email
from pathlib import Path

import pytest
import yaml

from nodeagent.cli import main
from nodeagent.userdata import nodeagent_parts
from tests.unit.test_userdata import CA, CONFIG

CLUSTER_ARGS = [
    "--cluster-name=my-cluster",
    "--api-server-endpoint=https://ABCD.gr7.us-west-2.eks.amazonaws.com",
    f"--certificate-authority={CA}",
    "--cidr=10.100.0.0/16",
]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(CONFIG)
    return p


def test_al2023_with_cluster(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(cfg), "--format", "al2023", *CLUSTER_ARGS]) == 0
    out = capsys.readouterr().out
    msg = email.message_from_string(out)
    types = [p.get_content_type() for p in msg.get_payload()]  # type: ignore[union-attr]
    assert types == ["application/nodeagent.yaml", "application/node.eks.aws"]
    assert nodeagent_parts(out.encode())[0][1] == CONFIG


def test_default_config_is_under_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc/nodeagent").mkdir(parents=True)
    (tmp_path / "etc/nodeagent/config.yaml").write_text(CONFIG)
    assert main(["userdata", "--root", str(tmp_path), "--format", "al2023"]) == 0
    assert nodeagent_parts(capsys.readouterr().out.encode())[0][1] == CONFIG


def test_partial_cluster_details_refused(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(cfg), "--format", "al2023", "--cluster-name=x"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--api-server-endpoint: required with --cluster-name" in captured.err
    assert "--cidr: required" in captured.err


def test_invalid_config_refused_before_rendering(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("kubelet:\n  imageMinimumGCAge: soon\n")
    assert main(["userdata", "-c", str(p), "--format", "al2023"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(p) in captured.err


def test_missing_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(tmp_path / "nope.yaml"), "--format", "karpenter"]) == 2
    assert "cannot read" in capsys.readouterr().err


def test_karpenter(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = [
        "userdata",
        "-c",
        str(cfg),
        "--format",
        "karpenter",
        "--cluster-name=prod",
        "--ami-tag=team=images",
    ]
    assert main([*args, "--name=fast"]) == 0
    nc, np = yaml.safe_load_all(capsys.readouterr().out)
    assert nc["metadata"]["name"] == np["metadata"]["name"] == "fast"
    assert nc["spec"]["amiSelectorTerms"] == [{"tags": {"team": "images"}}]
    assert nc["spec"]["role"] == "KarpenterNodeRole-prod"
    assert nodeagent_parts(nc["spec"]["userData"].encode())[0][1] == CONFIG


def test_bad_ami_tag(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(cfg), "--format", "karpenter", "--ami-tag=novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
