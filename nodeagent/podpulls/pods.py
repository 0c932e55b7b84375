"""What nodeagent needs to know about a pod to pull its images, independent of the Kubernetes client.

``PodInfo`` is built from the API server's Pod object (``from_api``); the puller works only with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

NEVER, IF_NOT_PRESENT, ALWAYS = "Never", "IfNotPresent", "Always"
_STRENGTH = {NEVER: 0, IF_NOT_PRESENT: 1, ALWAYS: 2}


@dataclass(frozen=True)
class PodImage:
    image: str
    policy: str  # Always | IfNotPresent | Never (the API server always fills it in)
    containers: tuple[str, ...]  # the containers that run it (kind:name, e.g. "init:migrate")


@dataclass(frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    phase: str
    deleting: bool = False
    images: tuple[PodImage, ...] = ()
    pull_secrets: tuple[str, ...] = ()
    runtime_class: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    resource_version: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def pending(self) -> bool:
        return self.phase == "Pending" and not self.deleting


def default_policy(image: str) -> str:
    """The API server's default: Always for ``:latest`` or no tag, else IfNotPresent."""
    if "@" in image:
        return IF_NOT_PRESENT
    last = image.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    return ALWAYS if tag in ("", "latest") else IF_NOT_PRESENT


def images_of(containers: list[tuple[str, str, str | None]]) -> tuple[PodImage, ...]:
    """``(kind:name, image, policy)`` of a pod's init containers (sidecars among them) then its
    containers, in the pod's order -> one entry per image (the strongest policy wins when two
    containers run one image with different policies)."""
    order: list[str] = []
    policy: dict[str, str] = {}
    users: dict[str, list[str]] = {}
    for who, image, pol in containers:
        if not image:
            continue
        p = pol if pol in _STRENGTH else default_policy(image)
        if image not in policy:
            order.append(image)
            policy[image] = p
            users[image] = []
        elif _STRENGTH[p] > _STRENGTH[policy[image]]:
            policy[image] = p
        users[image].append(who)
    return tuple(PodImage(i, policy[i], tuple(users[i])) for i in order)


def from_api(pod: Any) -> PodInfo:
    """A PodInfo from a lightkube ``core_v1.Pod`` (ephemeral containers are not pulled ahead: they
    are added to running pods by ``kubectl debug``, long after start-up)."""
    meta, spec = pod.metadata, pod.spec
    status = pod.status
    containers: list[tuple[str, str, str | None]] = []
    for c in spec.initContainers or []:
        kind = "sidecar" if c.restartPolicy == "Always" else "init"
        containers.append((f"{kind}:{c.name}", c.image or "", c.imagePullPolicy))
    for c in spec.containers or []:
        containers.append((f"container:{c.name}", c.image or "", c.imagePullPolicy))
    return PodInfo(
        uid=meta.uid or "",
        namespace=meta.namespace or "default",
        name=meta.name or "",
        phase=(status.phase if status is not None else None) or "Pending",
        deleting=meta.deletionTimestamp is not None,
        images=images_of(containers),
        pull_secrets=tuple(s.name for s in spec.imagePullSecrets or [] if s.name),
        runtime_class=spec.runtimeClassName or "",
        labels=dict(meta.labels or {}),
        annotations=dict(meta.annotations or {}),
        resource_version=meta.resourceVersion or "",
    )
