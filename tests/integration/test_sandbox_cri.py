"""Our CRI client against a real containerd on the sandbox node, with images from a local registry.

What users rely on: an image pulled through CRI is listed with its tag, digest and size as the
registry has them, ImageFsInfo reports the image filesystem and its usage grows by what was
unpacked, removal makes the image disappear; real pods and containers show up in
ListPodSandbox/ListContainers; stopping the node leaves no shim or container process behind.
"""

from __future__ import annotations

import asyncio
import time

import psutil
import pytest

from nodeagent.cri.client import CriClient, CriError
from nodeagent.cri.gen import cri_api_pb2 as pb
from tests.sandbox import Containerd, PushedImage, Registry, Sandbox
from tests.sandbox.pods import container_status, remove_pod, run_container, run_pod


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def image_fs_used(cri: CriClient, at_least: int = 0, wait: float = 5.0) -> tuple[str, int]:
    """(mountpoint, used_bytes) of the image filesystem, waiting for the stats refresh (1 s)."""
    deadline = time.monotonic() + wait
    while True:
        info = await cri.image_fs_info()
        assert len(info.image_filesystems) == 1
        fs = info.image_filesystems[0]
        if fs.used_bytes.value >= at_least or time.monotonic() > deadline:
            return fs.fs_id.mountpoint, fs.used_bytes.value
        await asyncio.sleep(0.2)


@pytest.mark.containerd_smoke
def test_pull_list_fsinfo_remove_round_trip(containerd: Containerd, image_factory) -> None:
    img: PushedImage = image_factory(layers=2, layer_size=2 << 20)

    async def body() -> None:
        async with CriClient(containerd.endpoint) as cri:
            mountpoint, used_before = await image_fs_used(cri)
            assert mountpoint.startswith(str(containerd.root))

            ref = await cri.pull_image(img.reference)
            assert ref == img.image_id  # containerd's image id is the config digest

            listed = [i for i in await cri.list_images() if i.id == img.image_id]
            assert len(listed) == 1
            image = listed[0]
            assert list(image.repo_tags) == [img.reference]
            assert list(image.repo_digests) == [f"{img.registry}/{img.repository}@{img.manifest_digest}"]
            assert image.size == img.size  # manifest + config + compressed layers

            status = await cri.image_status(img.reference)
            assert status.HasField("image") and status.image.id == img.image_id

            # unpacked snapshots of 2 x 2 MiB random bytes land on the image filesystem
            _, used_after = await image_fs_used(cri, at_least=used_before + 4 * (1 << 20))
            assert used_after - used_before >= 4 * (1 << 20)

            await cri.remove_image(img.reference)
            assert [i for i in await cri.list_images() if i.id == img.image_id] == []
            assert not (await cri.image_status(img.reference)).HasField("image")
            await cri.remove_image(img.reference)  # absent: still not an error (CRI contract)

    asyncio.run(body())


def test_pull_needs_credentials_on_an_auth_registry(sandbox: Sandbox) -> None:
    reg = sandbox.registry(auth=("puller", "pull-secret-1"))
    img = sandbox.image(reg, "private/app", layers=1, layer_size=64 << 10)
    node = sandbox.containerd([reg])

    async def body() -> None:
        async with CriClient(node.endpoint) as cri:
            with pytest.raises(CriError) as err:
                await cri.pull_image(img.reference)
            assert "PullImage" in str(err.value) and node.endpoint in str(err.value)
            ref = await cri.pull_image(
                img.reference, auth={"username": "puller", "password": "pull-secret-1"}
            )
            assert ref == img.image_id

    asyncio.run(body())
    assert "pull-secret-1" not in node.log_path.read_text()


def test_layers_come_from_the_local_registry(
    containerd: Containerd, registry: Registry, image_factory
) -> None:
    img = image_factory(layers=3, layer_size=128 << 10)
    mark = registry.mark()

    async def body() -> None:
        async with CriClient(containerd.endpoint) as cri:
            await cri.pull_image(img.reference)

    asyncio.run(body())
    fetched = {r.digest for r in registry.requests_since(mark) if r.is_blob and r.status == 200}
    assert fetched == {*img.layer_digests, img.image_id}


@pytest.mark.containerd_smoke
def test_real_pod_and_container_are_listed(pod_node: Containerd, image_factory, sandbox: Sandbox) -> None:
    app = image_factory(layers=1, layer_size=64 << 10, busybox=True)

    async def body() -> list[int]:
        async with CriClient(pod_node.endpoint) as cri:
            pod = await run_pod(cri, "web", log_dir=sandbox.dir / "logs")
            cid = await run_container(cri, pod, app.reference, "app")

            pods = await cri.list_pod_sandboxes()
            assert [(p.id, p.metadata.name, p.state) for p in pods] == [
                (pod.sandbox_id, "web", pb.SANDBOX_READY)
            ]
            containers = await cri.list_containers()
            assert [(c.id, c.pod_sandbox_id, c.metadata.name, c.state) for c in containers] == [
                (cid, pod.sandbox_id, "app", pb.CONTAINER_RUNNING)
            ]
            assert containers[0].image_ref == app.image_id
            status = await container_status(cri, cid)
            assert status.status.state == pb.CONTAINER_RUNNING

            # the container is a real process under this node's shim
            shims = pod_node.shim_pids()
            procs = [c for s in shims for c in psutil.Process(s).children(recursive=True)]
            assert any("sleep" in " ".join(p.cmdline()) for p in procs)
            pids = shims + [p.pid for p in procs]

            await remove_pod(cri, pod)
            assert await cri.list_containers() == []
            assert await cri.list_pod_sandboxes() == []
            return pids

    pids = asyncio.run(body())
    deadline = time.monotonic() + 10
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert [p for p in pids if alive(p)] == []  # removing the pod ended its shim and container


def test_stopping_a_pod_node_kills_its_shims_and_containers(pod_node: Containerd, sandbox: Sandbox) -> None:
    """A test that fails with a pod still running must not leave processes behind."""

    async def body() -> None:
        async with CriClient(pod_node.endpoint) as cri:
            pod = await run_pod(cri, "leftover", log_dir=sandbox.dir / "logs")
            assert pod.sandbox_id

    asyncio.run(body())
    shims = pod_node.shim_pids()
    assert shims, "a running pod has a shim"
    tree = [p.pid for s in shims for p in psutil.Process(s).children(recursive=True)] + shims
    pod_node.stop()
    assert [p for p in tree if alive(p)] == []


@pytest.mark.containerd_smoke
def test_what_containerd_protects_itself_per_line(
    pod_node: Containerd, image_factory, pause_image: PushedImage, sandbox: Sandbox
) -> None:
    """What nodeagent's eviction must not take for granted, stated per containerd line: neither 1.6
    nor 2.x refuses CRI RemoveImage of an image a running container uses (protecting it is the
    agent's job on both); 2.x reports its sandbox image pinned (``pinned_images.sandbox`` in the
    version-3 config), which the kubelet's image GC skips, while 1.6 never sets ``pinned``."""
    app = image_factory(layers=1, layer_size=64 << 10, busybox=True)

    async def body() -> None:
        async with CriClient(pod_node.endpoint) as cri:
            pod = await run_pod(cri, "in-use", log_dir=sandbox.dir / "logs")
            cid = await run_container(cri, pod, app.reference, "app")
            by_id = {i.id: i for i in await cri.list_images()}
            assert by_id[pause_image.image_id].pinned is (pod_node.line.major >= 2)
            assert by_id[app.image_id].pinned is False

            await cri.remove_image(app.reference)  # in use by a running container: no error
            assert app.image_id not in {i.id for i in await cri.list_images()}
            assert (await container_status(cri, cid)).status.state == pb.CONTAINER_RUNNING
            await remove_pod(cri, pod)

    asyncio.run(body())


@pytest.mark.containerd_smoke
def test_pull_path_per_line(sandbox: Sandbox, registry: Registry, image_factory) -> None:
    """containerd 2.1+ pulls CRI images through its transfer service unless the CRI images config has
    a setting the transfer service cannot honour, e.g. ``max_concurrent_downloads`` other than 3
    (then it logs the fallback at start); 1.6 has no transfer service at all."""
    img = image_factory(layers=1, layer_size=64 << 10)
    fallback = "Falling back to local image pull mode"
    plain = sandbox.containerd([registry])
    tuned = sandbox.containerd([registry], cri_options={"max_concurrent_downloads": 6})

    async def body() -> None:
        for node in (plain, tuned):
            async with CriClient(node.endpoint) as cri:
                assert await cri.pull_image(img.reference) == img.image_id

    asyncio.run(body())
    assert fallback not in plain.log_path.read_text()
    if plain.line.major >= 2:
        assert fallback in tuned.log_path.read_text()
    else:
        assert fallback not in tuned.log_path.read_text()
