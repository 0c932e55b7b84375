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
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NAMESPACE_NODE = 2  # runtime.v1.NamespaceMode.NODE


@dataclass
class Pod:
    sandbox_id: str
    config: Any  # runtime.v1.PodSandboxConfig
    containers: list[str] = field(default_factory=list)


def pod_config(name: str, log_dir: Path, *, namespace: str = "default", host_network: bool = True) -> Any:
    from nodeagent.cri.gen import cri_api_pb2 as pb

    log_dir.mkdir(parents=True, exist_ok=True)
    ns = pb.NamespaceOption(network=NAMESPACE_NODE) if host_network else pb.NamespaceOption()
    return pb.PodSandboxConfig(
        metadata=pb.PodSandboxMetadata(name=name, uid=uuid.uuid4().hex, namespace=namespace, attempt=0),
        hostname="" if host_network else name,  # host network shares the node's UTS namespace
        log_directory=str(log_dir),
        labels={"nodeagent-test": name},
        linux=pb.LinuxPodSandboxConfig(security_context=pb.LinuxSandboxSecurityContext(namespace_options=ns)),
    )


async def run_pod(cri: Any, name: str, *, log_dir: Path, host_network: bool = True) -> Pod:
    config = pod_config(name, log_dir, host_network=host_network)
    sandbox_id = await cri.run_pod_sandbox(config)
    return Pod(sandbox_id, config)


async def run_container(
    cri: Any, pod: Pod, image: str, name: str, command: list[str] | None = None, *, pull: bool = True
) -> str:
    """Create and start a container from ``image`` in ``pod`` (pulling the image first unless told not)."""
    from nodeagent.cri.gen import cri_api_pb2 as pb

    if pull:
        await cri.pull_image(image, sandbox_config=pod.config)
    config = pb.ContainerConfig(
        metadata=pb.ContainerMetadata(name=name, attempt=0),
        image=pb.ImageSpec(image=image),
        command=command or [],
        log_path=f"{name}.log",
        labels={"nodeagent-test": name},
    )
    cid = await cri.create_container(pod.sandbox_id, config, pod.config)
    pod.containers.append(cid)
    await cri.start_container(cid)
    return str(cid)


async def remove_pod(cri: Any, pod: Pod) -> None:
    for cid in pod.containers:
        await cri.stop_container(cid, grace=0)
        await cri.remove_container(cid)
    pod.containers.clear()
    await cri.stop_pod_sandbox(pod.sandbox_id)
    await cri.remove_pod_sandbox(pod.sandbox_id)
