"""Real pod sandboxes and containers through our CRI client (for "image in use" tests).

Needs a node started with ``pods=True`` (``Sandbox.pod_node``): containerd in a private mount
namespace with only cgroup2, crun without a cgroup manager, a runnable pause image. Pods use the
host network namespace (``NamespaceMode.NODE``), so no CNI is needed.

    async with CriClient(node.endpoint) as cri:
        pod = await run_pod(cri, "web", log_dir=sb.dir / "logs")
        cid = await run_container(cri, pod, image.reference, "app")   # pulls if needed, starts
        ...
        await remove_pod(cri, pod)                                      # stop + remove all of it

``Containerd.stop()`` also kills the node's shims and their containers, so a test that fails
before ``remove_pod`` leaves nothing running.

The calls that make and remove pods and containers are here, not on ``CriClient``: nodeagent itself
never makes them. They go through the client's channel, deadline and error handling
(``GrpcCaller._call``); the ones that create something are not retried.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.cri.client import CriClient
from nodeagent.cri.gen import cri_api_pb2 as pb

NAMESPACE_NODE = 2  # runtime.v1.NamespaceMode.NODE
LONG = 60.0  # deadline of the calls that create, stop or remove something


@dataclass
class Pod:
    sandbox_id: str
    config: pb.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


def pod_config(
    name: str, log_dir: Path, *, namespace: str = "default", host_network: bool = True
) -> pb.PodSandboxConfig:
    log_dir.mkdir(parents=True, exist_ok=True)
    ns = pb.NamespaceOption(network=NAMESPACE_NODE) if host_network else pb.NamespaceOption()
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=namespace, attempt=0),
        hostname="" if host_network else name,  # host network shares the node's UTS namespace
        log_directory=str(log_dir),
        labels={"nodeagent-test": name},
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns)),
    )


async def run_pod(cri: CriClient, name: str, *, log_dir: Path, host_network: bool = True) -> Pod:
    config = pod_config(name, log_dir, host_network=host_network)
    resp: pb.RunPodSandboxResponse = await cri._call(
        "RunPodSandbox",
        cri.runtime.RunPodSandbox,
        pb.RunPodSandboxRequest(config=config),
        deadline=max(cri.timeout, LONG),
        retry=False,
    )
    return Pod(resp.pod_sandbox_id, config)


async def run_container(
    cri: CriClient, pod: Pod, image: str, name: str, command: list[str] | None = None, *, pull: bool = True
) -> str:
    """Create and start a container from ``image`` in ``pod`` (pulling the image first unless told not)."""
    if pull:
        await cri.pull_image(image, sandbox_config=pod.config)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=command or [],
        log_path=f"{name}.log",
        labels={"nodeagent-test": name},
    )
    created: pb.CreateContainerResponse = await cri._call(
        "CreateContainer",
        cri.runtime.CreateContainer,
        pb.CreateContainerRequest(pod_sandbox_id=pod.sandbox_id, config=config, sandbox_config=pod.config),
        deadline=max(cri.timeout, LONG),
        retry=False,
    )
    cid = created.container_id
    pod.containers.append(cid)
    await cri._call(
        "StartContainer",
        cri.runtime.StartContainer,
        pb.StartContainerRequest(container_id=cid),
        deadline=max(cri.timeout, LONG),
        retry=False,
    )
    return cid


async def container_status(cri: CriClient, container_id: str) -> pb.ContainerStatusResponse:
    resp: pb.ContainerStatusResponse = await cri._call(
        "ContainerStatus",
        cri.runtime.ContainerStatus,
        pb.ContainerStatusRequest(container_id=container_id),
        deadline=cri.timeout,
    )
    return resp


async def remove_pod(cri: CriClient, pod: Pod) -> None:
    for cid in pod.containers:
        await cri._call(
            "StopContainer",
            cri.runtime.StopContainer,
            pb.StopContainerRequest(container_id=cid, timeout=0),
            deadline=cri.timeout,
        )
        await cri._call(
            "RemoveContainer",
            cri.runtime.RemoveContainer,
            pb.RemoveContainerRequest(container_id=cid),
            deadline=max(cri.timeout, LONG),
        )
    pod.containers.clear()
    for name, method, request in (
        (
            "StopPodSandbox",
            cri.runtime.StopPodSandbox,
            pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
        ),
        (
            "RemovePodSandbox",
            cri.runtime.RemovePodSandbox,
            pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id),
        ),
    ):
        await cri._call(name, method, request, deadline=max(cri.timeout, LONG))
