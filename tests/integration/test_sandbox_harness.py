"""The sandbox-node harness itself: the components start for real, behave as the notes say, and
everything is gone after teardown (no process, no mount, no loop device, no temp dir)."""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

from tests.sandbox import Containerd, ContainerdLine, Registry, Sandbox, build_image, cri_version, push_image
from tests.sandbox.mounts import mounts_under


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.containerd_smoke
def test_containerd_answers_cri_and_survives_kill_and_restart(containerd: Containerd) -> None:
    assert containerd.endpoint == f"unix://{containerd.socket}"
    assert b"containerd" in cri_version(containerd.endpoint)
    assert str(containerd.hosts_dir) in containerd.config_path.read_text()
    first = containerd.pid
    assert first is not None
    containerd.kill()
    assert gone(first)
    containerd.start()
    assert containerd.pid != first
    assert b"containerd" in cri_version(containerd.endpoint)
    containerd.stop()
    assert not containerd.running
    with pytest.raises(Exception, match=r"(?i)unavailable|connect|no such file"):
        cri_version(containerd.endpoint, timeout=1)


@pytest.mark.no_containerd
def test_pushed_image_is_served_by_digest_and_logged(registry: Registry, image_factory) -> None:
    img = image_factory(layers=2, layer_size=256 << 10, seed=7)
    status, body = http_get(
        f"{registry.url}/v2/{img.repository}/manifests/{img.manifest_digest}",
        {"Accept": img.image.manifest_media_type},
    )
    assert status == 200
    manifest = json.loads(body)
    assert [layer["digest"] for layer in manifest["layers"]] == img.layer_digests
    assert manifest["config"]["digest"] == img.image_id
    assert img.size == len(body) + manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
    mark = registry.mark()
    status, blob = http_get(f"{registry.url}/v2/{img.repository}/blobs/{img.layer_digests[1]}")
    assert status == 200 and len(blob) > 256 << 10  # random bytes do not compress
    served = [r for r in registry.requests_since(mark) if r.is_blob]
    assert [(r.method, r.digest, r.status) for r in served] == [("GET", img.layer_digests[1], 200)]


@pytest.mark.no_containerd
def test_auth_registry_needs_the_password(sandbox: Sandbox) -> None:
    reg = sandbox.registry(auth=("alice", "s3cret-pw"))
    assert http_get(f"{reg.url}/v2/")[0] == 401
    assert http_get(f"{reg.url}/v2/", {"Authorization": reg.authorization() or ""})[0] == 200
    img = sandbox.image(reg, "private/app", layers=1, layer_size=1024)
    assert img.reference == f"{reg.host}/private/app:v1"
    # the clear-text password is in no file the harness wrote except the registry's own 0600 config
    assert "s3cret-pw" not in reg.htpasswd_path.read_text()
    assert "s3cret-pw" not in reg.log_path.read_text()


@pytest.mark.no_containerd
def test_pull_through_mirror_serves_from_its_cache(sandbox: Sandbox) -> None:
    upstream = sandbox.registry()
    mirror = sandbox.registry(proxy_of=upstream)
    img = sandbox.image(upstream, "lib/app", layers=1, layer_size=64 << 10)
    layer = img.layer_digests[0]
    for _ in range(3):
        status, _ = http_get(f"{mirror.url}/v2/lib/app/blobs/{layer}")
        assert status == 200
        time.sleep(0.5)  # the mirror writes its cached copy after answering
    mark = upstream.mark()
    status, body = http_get(f"{mirror.url}/v2/lib/app/blobs/{layer}")
    assert status == 200 and len(body) == img.image.layers[0].size
    assert [r.digest for r in mirror.blob_requests()] == [layer] * 4
    assert 1 <= [r.digest for r in upstream.blob_requests()].count(layer) < 4
    assert [r for r in upstream.requests_since(mark) if r.is_blob] == []  # served from the cache
    with pytest.raises(ValueError, match="Basic-auth"):
        Registry(sandbox.dir / "x", proxy_of=sandbox.registry(auth=("u", "p")))


@pytest.mark.no_containerd
def test_misbehaving_endpoints(sandbox: Sandbox) -> None:
    refused = sandbox.refused_port()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((refused.host, refused.port), timeout=2)
    hung = sandbox.hung_server()
    with socket.create_connection((hung.host, hung.port), timeout=2) as s:
        s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(0.5)
        with pytest.raises(TimeoutError):
            s.recv(1)
    reg = sandbox.registry()
    img = sandbox.image(reg, "slow/app", layers=1, layer_size=600 << 10)
    proxy = sandbox.throttle_proxy(reg, rate=400 << 10)
    t0 = time.monotonic()
    status, body = http_get(f"{proxy.url}/v2/slow/app/blobs/{img.layer_digests[0]}")
    elapsed = time.monotonic() - t0
    assert status == 200 and len(body) == img.image.layers[0].size
    assert elapsed >= 1.3  # 600 KiB at 400 KiB/s per connection
    assert proxy.connections >= 1


@pytest.mark.no_containerd
def test_loopfs_is_a_small_real_filesystem(sandbox: Sandbox) -> None:
    fs = sandbox.loopfs(32)
    _used, total = fs.usage()
    assert 24 << 20 < total <= 32 << 20
    assert mounts_under(fs.mountpoint) == [fs.mountpoint]
    assert len(fs.loop_devices()) == 1
    fs.destroy()
    assert mounts_under(fs.mountpoint) == []
    assert fs.loop_devices() == []


@pytest.mark.containerd_smoke
def test_sandbox_cleans_up_everything_even_when_the_body_fails(containerd_line: ContainerdLine) -> None:
    with (
        pytest.raises(RuntimeError, match="test body failed"),
        Sandbox(containerd_line=containerd_line) as sb,
    ):
        reg = sb.registry()
        node, _pause = sb.pod_node(reg)
        disk = sb.loopfs(16)
        image_file = disk.image
        plain = sb.containerd([reg], root_dir=disk.mountpoint / "root")
        sb.throttle_proxy(reg, 1 << 20)
        sb.hung_server()
        pids = list(sb.pids)
        assert {reg.pid, node.pid, plain.pid} <= set(pids)
        assert all(psutil.pid_exists(p) for p in pids)
        base = sb.dir
        raise RuntimeError("test body failed")
    assert all(gone(p) for p in pids)
    assert mounts_under(base) == []
    assert not Path(base).exists()
    assert not image_file.exists()
    assert [line for line in Path("/proc/self/mountinfo").read_text().splitlines() if str(base) in line] == []


def test_images_are_random_and_sized_as_asked() -> None:
    a = build_image(layers=3, layer_size=100_000)
    b = build_image(layers=3, layer_size=100_000)
    assert len(a.layers) == 3
    assert all(100_000 < layer.size < 110_000 for layer in a.layers)  # gzip cannot shrink random bytes
    assert a.manifest_digest != b.manifest_digest
    assert build_image(seed=1).manifest_digest == build_image(seed=1).manifest_digest
    assert push_image  # exported for scripts


PROBE = """
import json, os
from pathlib import Path

def test_probe(pod_node, containerd, registry_factory, loopfs_factory, throttle_proxy_factory, sandbox,
               session_sandbox, registry):
    reg = registry_factory()
    disk = loopfs_factory(16)
    proxy = throttle_proxy_factory(reg, 1 << 20)
    Path(os.environ["PROBE_OUT"]).write_text(json.dumps({
        "pids": [pod_node.pid, containerd.pid, reg.pid, registry.pid],
        "dirs": [str(sandbox.dir), str(session_sandbox.dir)],
        "disk": str(disk.image),
        "port": proxy.port,
    }))
    assert False, "the probe fails on purpose"
"""


def test_fixtures_clean_up_after_a_failing_test(tmp_path: Path) -> None:
    """Run the real fixtures in an inner pytest whose test fails; afterwards nothing is left."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    probe = tmp_path / "test_probe.py"
    probe.write_text(PROBE)
    out = tmp_path / "probe.json"
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(probe)],
        cwd=repo,
        env={**os.environ, "PROBE_OUT": str(out), "CI": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 1 and "the probe fails on purpose" in r.stdout, r.stdout + r.stderr
    seen = json.loads(out.read_text())
    assert len(seen["pids"]) == 4
    assert all(gone(pid) for pid in seen["pids"])
    mountinfo = Path("/proc/self/mountinfo").read_text()
    for d in seen["dirs"]:
        assert not Path(d).exists()
        assert d not in mountinfo
    assert not Path(seen["disk"]).exists()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", seen["port"]), timeout=2)
