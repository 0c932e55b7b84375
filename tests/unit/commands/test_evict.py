"""``nodeagent evict --dry-run`` against the FAKE CRI runtime of tests/unit/cri/fakes.py (real
runtime.v1 wire protocol, not containerd; the real one is in tests/integration/test_eviction.py)."""

from __future__ import annotations

import argparse
import asyncio
import io
from pathlib import Path

import pytest

from nodeagent import config
from nodeagent.commands import evict
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.eviction import baked, usage
from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.policy import FsUsage
from nodeagent.images.lastused import LastUsed
from nodeagent.util.paths import Paths
from tests.unit.cri.fakes import Plan, fake_runtime

MB = 1_000_000
NOW = 1_800_000_000.0
HEAD = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"


def sha(n: int) -> str:
    return f"sha256:{n:064x}"


def cri_image(n: int, repo: str, size_mb: int, pinned: bool = False) -> pb.Image:
    return pb.Image(
        id=sha(n),
        repo_tags=[f"reg.example/{repo}:v1"],
        repo_digests=[f"reg.example/{repo}@{sha(1000 + n)}"],
        size=size_mb * MB,
        pinned=pinned,
    )


def write_config(root: Path, body: str) -> Path:
    p = Paths(root).config_file
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(HEAD + body)
    return p


def test_dry_run_plan_from_the_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = Paths(tmp_path)
    mount = tmp_path / "imagefs"
    mount.mkdir()
    write_config(
        tmp_path,
        "eviction:\n  highThresholdPercent: 60\n  lowThresholdPercent: 40\n  minUnusedAge: 10m\n"
        "images:\n  protect: ['reg.example/system/*']\n",
    )
    baked.write(paths.baked_manifest, [BakedImage("reg.example/baked:v1", sha(1003), 1, True)])
    lu = LastUsed(paths.last_used_file)
    lu.touch(sha(1), NOW - 7200)
    lu.touch("reg.example/old:v1", NOW - 86400)  # by tag
    lu.touch(sha(6), NOW - 60)
    lu.save()
    measured: list[Path] = []

    def fake_measure(p: Path) -> FsUsage:
        measured.append(p)
        return FsUsage(150 * MB, 200 * MB)  # 75%: above high (60%), low is 80 MB

    monkeypatch.setattr(usage, "measure", fake_measure)

    async def body() -> evict.DryRun:
        async with fake_runtime() as (rt, endpoint):
            images = [
                cri_image(0, "old", 40),
                cri_image(1, "mid", 30),
                cri_image(2, "never", 20),
                cri_image(3, "baked", 50),
                cri_image(4, "system/agent", 10),
                cri_image(5, "pinned", 10, pinned=True),
                cri_image(6, "recent", 10),
                cri_image(7, "in-use", 10),
            ]
            rt.plans["ListImages"] = Plan(response=pb.ListImagesResponse(images=images))
            rt.plans["ListContainers"] = Plan(
                response=pb.ListContainersResponse(
                    containers=[
                        pb.Container(id="c" * 64, image=pb.ImageSpec(image="reg.example/in-use:v1"), state=2)
                    ]
                )
            )
            fs = pb.FilesystemUsage(fs_id=pb.FilesystemIdentifier(mountpoint=str(mount)))
            rt.plans["ImageFsInfo"] = Plan(response=pb.ImageFsInfoResponse(image_filesystems=[fs]))
            cfg = config.load(paths.config_file)
            cfg = config.Config(
                cri=config.model.CriConfig(endpoint=endpoint, timeout=2.0),
                images=cfg.images,
                eviction=cfg.eviction,
            )
            return await evict.dry_run(cfg, paths, now=NOW)

    result = asyncio.run(body())
    assert measured == [mount]  # the runtime's mountpoint
    p = result.plan
    # never used first, then by last use: never(20) -> old(40): 150-60 = 90 > 80 -> mid(30): 60
    assert [d.image.repo_tags[0] for d in p.removals] == [
        "reg.example/never:v1",
        "reg.example/old:v1",
        "reg.example/mid:v1",
    ]
    reasons = {d.image.repo_tags[0].split("/", 1)[1]: d.reason for d in p.decisions}
    assert reasons == {
        "never:v1": "lru",
        "old:v1": "lru",
        "mid:v1": "lru",
        "baked:v1": "baked",
        "system/agent:v1": "protected",
        "pinned:v1": "pinned",
        "recent:v1": "too_recent",
        "in-use:v1": "in_use",
    }
    text = evict.render(result)
    lines = text.splitlines()
    assert lines[0] == (
        f"imagefs {mount}: 150.0 MB of 200.0 MB used (75.0%); high 60%, low 40%, minUnusedAge 600s"
    )
    assert lines[1] == "would remove 3 image(s), 90.0 MB; projected usage 60.0 MB (30.0%)"
    assert lines[3].split() == ["#", "IMAGE", "SIZE", "LAST", "USED", "DECISION", "REASON", "DETAIL"]
    assert lines[4].split()[:6] == ["1", "reg.example/never:v1", "20.0", "MB", "never", "remove"]
    assert lines[5].split()[:7] == ["2", "reg.example/old:v1", "40.0", "MB", "1d00h", "ago", "remove"]
    agent = [
        "reg.example/system/agent:v1",
        "10.0",
        "MB",
        "never",
        "keep",
        "protected",
        "reg.example/system/*",
    ]
    assert agent in [line.split() for line in lines]


def test_render_says_when_low_cannot_be_reached() -> None:
    from nodeagent.eviction.policy import Image, Thresholds, plan

    p = plan(
        [Image(sha(1), ("r/a:v1",), (), 10 * MB, pinned=True)],
        [],
        usage=FsUsage(190 * MB, 200 * MB),
        thresholds=Thresholds(60, 40, 0),
        now=NOW,
        last_used={},
    )
    text = evict.render(evict.DryRun(p, Path("/x"), NOW))
    assert "would remove 0 image(s), 0 B; projected usage 190.0 MB (95.0%)" in text
    assert "cannot reach the low threshold" in text


def test_below_high_nothing_to_remove() -> None:
    from nodeagent.eviction.policy import Image, Thresholds, plan

    p = plan(
        [Image(sha(1), ("r/a:v1",), (), MB)],
        [],
        usage=FsUsage(MB, 200 * MB),
        thresholds=Thresholds(60, 40, 0),
        now=NOW,
        last_used={},
    )
    text = evict.render(evict.DryRun(p, Path("/x"), NOW))
    assert "below the high threshold (120.0 MB): nothing to remove" in text
    assert "not_needed" in text


def args(root: Path) -> argparse.Namespace:
    return argparse.Namespace(root=str(root), config=None, dry_run=True)


def test_invalid_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path, "eviction:\n  highThresholdPercent: 300\n")
    assert evict.run(args(tmp_path)) == 2
    assert "eviction.highThresholdPercent" in capsys.readouterr().err


def test_unreachable_runtime_exits_1_naming_the_endpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = tmp_path / "none.sock"
    write_config(tmp_path, f"cri:\n  endpoint: unix://{sock}\n  timeout: 1s\n")
    out = io.StringIO()
    assert evict.run(args(tmp_path), out) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"nodeagent evict: unix://{sock}: ")
    assert out.getvalue() == ""


def test_bad_baked_manifest_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_config(tmp_path, "")
    Paths(tmp_path).baked_manifest.write_text("{")
    assert evict.run(args(tmp_path)) == 1
    assert f"{Paths(tmp_path).baked_manifest}: not valid JSON" in capsys.readouterr().err
