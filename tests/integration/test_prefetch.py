"""`nodeagent prefetch` as a process against a real containerd (CRI) and real registries; one of them
requires credentials, which come from a FAKE credential provider plugin speaking the kubelet's real
exec protocol (tests/integration/data/fake-credential-provider)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodeagent.cri.client import CriClient
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox

DATA = Path(__file__).parent / "data"
USER, PASSWORD = "alice", "s3cret-Pa55word"


def write_node_root(
    root: Path,
    node: Containerd,
    prefetch: list[dict[str, Any]],
    *,
    auth_registry: Registry | None = None,
    log: Path | None = None,
    extra: dict[str, Any] | None = None,
) -> None:
    """A --root tree: nodeagent config + the kubelet's credential provider config and plugin dir."""
    images: dict[str, Any] = {"prefetch": prefetch, "prefetchConcurrency": 3, "prefetchBudget": "2m"}
    images.update(extra or {})
    cfg = {
        "apiVersion": "nodeagent.io/v1alpha1",
        "kind": "NodeAgentConfig",
        "cri": {"endpoint": node.endpoint},
        "images": images,
    }
    (root / "etc/nodeagent").mkdir(parents=True, exist_ok=True)
    (root / "etc/nodeagent/config.yaml").write_text(yaml.safe_dump(cfg))
    if auth_registry is not None:
        assert log is not None
        bindir = root / "etc/eks/image-credential-provider"
        bindir.mkdir(parents=True, exist_ok=True)
        shutil.copy(DATA / "fake-credential-provider", bindir / "fake-credential-provider")
        provider_cfg = {
            "apiVersion": "kubelet.config.k8s.io/v1",
            "kind": "CredentialProviderConfig",
            "providers": [
                {
                    "name": "fake-credential-provider",
                    "apiVersion": "credentialprovider.kubelet.k8s.io/v1",
                    "matchImages": [auth_registry.host],
                    "defaultCacheDuration": "10m",
                    "args": ["--fake-arg"],
                    "env": [
                        {"name": "FAKE_PROVIDER_REGISTRY", "value": auth_registry.host},
                        {"name": "FAKE_PROVIDER_USERNAME", "value": USER},
                        {"name": "FAKE_PROVIDER_PASSWORD", "value": PASSWORD},
                        {"name": "FAKE_PROVIDER_LOG", "value": str(log)},
                    ],
                }
            ],
        }
        (bindir / "config.json").write_text(json.dumps(provider_cfg))


def run_prefetch(root: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, NODEAGENT_IMDS="off")
    return subprocess.run(
        [sys.executable, "-m", "nodeagent", "prefetch", "--root", str(root), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def summary_rows(stdout: str) -> dict[str, list[str]]:
    """IMAGE -> [DIGEST, SIZE, TIME, RESULT...] from the summary table."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("IMAGE "))
    rows: dict[str, list[str]] = {}
    for line in lines[start + 1 :]:
        if line.startswith("prefetch:") or line.startswith("  "):
            break
        cols = re.split(r"\s{2,}", line.strip())
        rows[cols[0]] = cols[1:]
    return rows


async def _status(endpoint: str, ref: str) -> Any:
    async with CriClient(endpoint) as cri:
        return await cri.image_status(ref)


def test_prefetch_six_images_with_credentials_then_skip_all(
    sandbox: Sandbox,
    registry: Registry,
    registry_factory: Callable[..., Registry],
    image_factory: Callable[..., PushedImage],
    tmp_path: Path,
) -> None:
    auth_reg = registry_factory(auth=(USER, PASSWORD))
    public = [image_factory(layers=2, layer_size=256 << 10) for _ in range(4)]
    private = image_factory(layers=1, layer_size=256 << 10, to=auth_reg)
    missing = f"{registry.host}/test/never-pushed:v1"
    node = sandbox.containerd([registry, auth_reg])
    log = tmp_path / "provider.log"
    prefetch = [
        {"image": public[0].reference, "required": True, "pin": True},
        {"image": public[1].reference, "required": True},
        {"image": public[2].reference},
        {"image": public[3].reference},
        {"image": private.reference, "required": True},
        {"image": missing, "required": False},
    ]
    root = tmp_path / "root"
    write_node_root(root, node, prefetch, auth_registry=auth_reg, log=log)

    r = run_prefetch(root)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    rows = summary_rows(r.stdout)
    for img in [*public, private]:
        digest, size, _time, result = rows[img.reference][:4]
        assert result == "pulled", out
        assert img.manifest_digest.startswith(digest), (digest, img.manifest_digest)
        assert size != "-"
    assert rows[missing][-1].startswith("FAILED not_found"), out
    assert "(required)" not in rows[missing][-1]
    assert re.search(r"prefetch: 6 image\(s\): 5 pulled, 1 not_found in ", r.stdout), r.stdout
    # The fake provider was asked once (its answer is cached per registry) for the private image only.
    assert log.read_text().splitlines() == [f"{private.reference} --fake-arg"]
    assert PASSWORD not in out
    for img in [*public, private]:
        st = asyncio.run(_status(node.endpoint, img.reference))
        assert st.HasField("image") and st.image.id == img.image_id

    # Second run: everything already there is skipped: no blob fetched, no provider run, fast.
    mark_pub, mark_auth = registry.mark(), auth_reg.mark()
    r2 = run_prefetch(root)
    assert r2.returncode == 0, r2.stdout + r2.stderr
    rows2 = summary_rows(r2.stdout)
    for img in [*public, private]:
        _digest, _size, took, result = rows2[img.reference][:4]
        assert result == "present"
        assert float(took.rstrip("s")) < 0.5, r2.stdout  # well under a second per image
    assert rows2[missing][-1].startswith("FAILED not_found")
    assert not [q for q in registry.requests_since(mark_pub) if q.is_blob]
    assert auth_reg.requests_since(mark_auth) == []
    assert len(log.read_text().splitlines()) == 1


def test_prefetch_exits_1_when_a_required_image_is_missing(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage], tmp_path: Path
) -> None:
    present = image_factory(layers=1, layer_size=64 << 10)
    node = sandbox.containerd([registry])
    missing = f"{registry.host}/test/not-there:v9"
    root = tmp_path / "root"
    write_node_root(root, node, [{"image": present.reference}, {"image": missing, "required": True}])
    r = run_prefetch(root)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAILED not_found (required)" in r.stdout
    assert "1 required image(s) missing" in r.stdout
    # Not a terminal: one plain line per event, no cursor movement.
    assert "\x1b[" not in r.stdout
    assert re.search(rf"^\[\s*\d+\.\d+s\] {re.escape(present.reference)}: pulled \(sha256:", r.stdout, re.M)


def test_prefetch_on_a_terminal_draws_a_live_view(
    sandbox: Sandbox, registry: Registry, image_factory: Callable[..., PushedImage], tmp_path: Path
) -> None:
    import pty

    imgs = [image_factory(layers=1, layer_size=64 << 10) for _ in range(2)]
    node = sandbox.containerd([registry])
    root = tmp_path / "root"
    write_node_root(root, node, [{"image": i.reference} for i in imgs])
    leader, follower = pty.openpty()
    try:
        p = subprocess.Popen(
            [sys.executable, "-m", "nodeagent", "prefetch", "--root", str(root)],
            stdout=follower,
            stderr=follower,
            env=dict(os.environ, NODEAGENT_IMDS="off"),
        )
        os.close(follower)
        follower = -1
        chunks = []
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert p.wait(timeout=120) == 0
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    out = b"".join(chunks).decode()
    assert "\x1b[2F" in out  # redrawn in place over the 2-line view
    for i in imgs:
        assert f"✓ {i.reference}  pulled sha256:" in out
    assert "prefetch: 2 image(s): 2 pulled in " in out


@pytest.mark.parametrize("docker_config", [False, True], ids=["no-credentials", "docker-config"])
def test_prefetch_of_a_private_image_uses_the_docker_config_auths(
    sandbox: Sandbox,
    registry_factory: Callable[..., Registry],
    image_factory: Callable[..., PushedImage],
    tmp_path: Path,
    docker_config: bool,
) -> None:
    """Without credentials a private image fails ``unauthorized``; with the kubelet's docker config
    (images.dockerConfig) it is pulled, and the secret is never printed."""
    import base64

    auth_reg = registry_factory(auth=(USER, PASSWORD))
    private = image_factory(layers=1, layer_size=64 << 10, to=auth_reg)
    node = sandbox.containerd([auth_reg])
    root = tmp_path / "root"
    write_node_root(root, node, [{"image": private.reference, "required": True}])
    token = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    if docker_config:
        docker_cfg = root / "var/lib/kubelet/config.json"  # images.dockerConfig default, under --root
        docker_cfg.parent.mkdir(parents=True)
        docker_cfg.write_text(json.dumps({"auths": {auth_reg.host: {"auth": token}}}))
    r = run_prefetch(root)
    if docker_config:
        assert r.returncode == 0, r.stdout + r.stderr
        assert summary_rows(r.stdout)[private.reference][-1] == "pulled"
    else:
        assert r.returncode == 1
        assert "FAILED unauthorized (required)" in r.stdout, r.stdout
    assert PASSWORD not in r.stdout + r.stderr and token not in r.stdout + r.stderr
