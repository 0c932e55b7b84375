"""``nodeagent userdata``: validates the config first, then prints al2023 MIME or Karpenter objects."""

from __future__ import annotations

import email
from pathlib import Path

import pytest
import yaml

from nodeagent import config
from nodeagent.cli import main
from nodeagent.eks import userdata
from nodeagent.eks.userdata import nodeagent_parts
from tests.unit.test_userdata import CA, CONFIG

COMMENTED = "# fleet settings for one node group\n" + CONFIG.replace(
    "  maxParallelImagePulls: 8\n", "  maxParallelImagePulls: 8   # sized for c6i.4xlarge\n\n"
)


def same_settings(part: str) -> bool:
    return config.load_text(part) == config.load_text(CONFIG)


CLUSTER_ARGS = [
    "--cluster-name=my-cluster",
    "--api-server-endpoint=https://ABCD.gr7.us-west-2.eks.amazonaws.com",
    f"--certificate-authority={CA}",
    "--cidr=10.100.0.0/16",
]


@pytest.fixture
def cfg(tmp_path: Path) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(COMMENTED)
    return p


def test_al2023_with_cluster(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(cfg), "--format", "al2023", *CLUSTER_ARGS]) == 0
    out = capsys.readouterr().out
    msg = email.message_from_string(out)
    types = [p.get_content_type() for p in msg.get_payload()]  # type: ignore[union-attr]
    assert types == ["application/nodeagent.yaml", "application/node.eks.aws"]
    part = nodeagent_parts(out.encode())[0][1]
    assert same_settings(part) and "#" not in part and "\n\n" not in part  # settings, not comments


def test_default_config_is_under_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "etc/nodeagent").mkdir(parents=True)
    (tmp_path / "etc/nodeagent/config.yaml").write_text(CONFIG)
    assert main(["userdata", "--root", str(tmp_path), "--format", "al2023"]) == 0
    assert same_settings(nodeagent_parts(capsys.readouterr().out.encode())[0][1])


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
    captured = capsys.readouterr()
    nc, np = yaml.safe_load_all(captured.out)
    assert nc["metadata"]["name"] == np["metadata"]["name"] == "fast"
    assert nc["spec"]["amiSelectorTerms"] == [{"tags": {"team": "images"}}]
    assert nc["spec"]["role"] == "KarpenterNodeRole-prod"
    assert same_settings(nodeagent_parts(nc["spec"]["userData"].encode())[0][1])
    size = len(nc["spec"]["userData"].encode())
    assert captured.err == f"user-data: {size} bytes (EC2 limit 16384)\n"
    # no startup taint: nothing may remove it (a node cannot change its own taints)
    assert "startupTaints" not in np["spec"]["template"]["spec"]
    assert "taint" not in captured.out.lower().replace("no startup taint", "")


def test_startup_taint_only_with_its_remover(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["userdata", "-c", str(cfg), "--format", "karpenter"]
    assert main([*base, "--startup-taint"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "--startup-taint: needs --remover-image IMAGE" in captured.err
    assert main([*base, "--remover-image=r.example/nodeagent:1"]) == 2
    assert "--remover-image: only with --startup-taint" in capsys.readouterr().err
    assert main([*base, "--startup-taint", "--remover-image=r/n:1", "--remover-max-wait=soon"]) == 2
    assert "--remover-max-wait: 'soon' is not a duration" in capsys.readouterr().err

    assert (
        main([*base, "--startup-taint", "--remover-image=r.example/nodeagent:1", "--remover-max-wait=0"]) == 0
    )
    captured = capsys.readouterr()
    docs = list(yaml.safe_load_all(captured.out))
    assert [d["kind"] for d in docs] == [
        "EC2NodeClass", "NodePool", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Deployment",
    ]  # fmt: skip
    assert docs[1]["spec"]["template"]["spec"]["startupTaints"][0]["key"] == "nodeagent.io/images-not-ready"
    assert docs[5]["spec"]["template"]["spec"]["containers"][0]["command"][-1] == "--max-wait=0"
    size = len(docs[0]["spec"]["userData"].encode())  # the size reported is still the user-data's
    assert captured.err == f"user-data: {size} bytes (EC2 limit 16384)\n"


def test_size_is_reported_and_a_warning_comes_near_the_ec2_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = tmp_path / "big.yaml"
    protect = "".join(f"    - registry.example.com/team-{i:04d}/*\n" for i in range(400))
    p.write_text(CONFIG + "images:\n  protect:\n" + protect)
    assert main(["userdata", "-c", str(p), "--format", "al2023"]) == 0
    captured = capsys.readouterr()
    size = len(captured.out.encode())
    assert userdata.USERDATA_WARN_BYTES < size <= userdata.EC2_USERDATA_LIMIT
    assert f"user-data: {size} bytes (EC2 limit 16384)" in captured.err
    assert "warning: user-data is" in captured.err and "near EC2's limit" in captured.err

    more = "".join(f"    - registry.example.com/other-{i:04d}/*\n" for i in range(400))
    p.write_text(CONFIG + "images:\n  protect:\n" + protect + more)
    assert main(["userdata", "-c", str(p), "--format", "al2023"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "more than EC2's limit of 16384 bytes" in captured.err


def test_comments_of_a_big_example_do_not_count(capsys: pytest.CaptureFixture[str]) -> None:
    example = Path(__file__).resolve().parents[3] / "docs/config.example.yaml"
    assert main(["userdata", "-c", str(example), "--format", "al2023"]) == 0
    out = capsys.readouterr().out
    assert len(out.encode()) < len(example.read_bytes()) / 2
    assert config.load_text(nodeagent_parts(out.encode())[0][1]) == config.load(str(example))


def test_bad_ami_tag(cfg: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["userdata", "-c", str(cfg), "--format", "karpenter", "--ami-tag=novalue"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
