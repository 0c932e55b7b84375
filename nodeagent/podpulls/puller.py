"""Pull every image a pod needs at once, as soon as nodeagent sees the pod bound to its node.

Per pod (``PodPuller.submit``, once per pod UID while it is Pending): each image that may need a pull
takes its place in line for a slot of the daemon's pull limit (``nodeagent.proxy.slots``, shared with
prefetch through the proxy; ``podPulls.concurrency``) at once, in the pod's order (init containers and
sidecars, then containers), so a pod's images start before the next pod's. Then its pull secrets and
runtime handler are read and one task per image runs. Per image, once it has its slot:

- ``Never``: skipped (``skipped_policy``);
- ``IfNotPresent``: ImageStatus first; present -> ``present``;
- the disk guard may refuse it (``skipped_disk``, with the reason): the kubelet will pull it itself;
- else PullImage through the proxy's single-flight table (origin ``pod``), with the credentials the
  kubelet would use (the pod's pull secrets, then the credential provider plugins and docker config
  of ``nodeagent.images.credentials``) and a PodSandboxConfig with the pod's metadata, labels and annotations.
  ``Always`` pulls too: the kubelet's own pull then resolves against a present image, or joins ours.

Two pods that need the same pull (same key as the proxy's single-flight) share one task, so a
pod waiting for another pod's pull holds no slot (it gives its place back).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from nodeagent.images.credentials import Auth, CredentialError, Credentials, best_match
from nodeagent.podpulls.pods import ALWAYS, IF_NOT_PRESENT, NEVER, PodImage, PodInfo
from nodeagent.proxy.slots import Place, PullSlots
from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.cri.gen import cri_api_pb2 as pb

log = get_logger(__name__)

PULLED, PRESENT, SKIPPED_POLICY, SKIPPED_DISK, FAILED = (
    "pulled",
    "present",
    "skipped_policy",
    "skipped_disk",
    "failed",
)
RECENT_PODS = 20
SEEN_PODS = 4096  # UIDs remembered so that a relist or an update does not handle a pod twice
MAX_REASON_CHARS = 300

# pull(request bytes) -> PullImageResponse bytes; raises RpcError / CriError
PullFn = Callable[[bytes], Awaitable[bytes]]
# image_present(image) -> bool
PresentFn = Callable[[str], Awaitable[bool]]


class DiskCheck(Protocol):
    """nodeagent/podpulls/disk.py's DiskGuard: ``check`` -> (reason to skip, None) or (None, ticket)."""

    async def check(self, image: str, auth: Any) -> tuple[str | None, int | None]: ...
    def done(self, ticket: int | None) -> None: ...
    async def close(self) -> None: ...


SecretsFn = Callable[[str, Sequence[str]], Awaitable[list[dict[str, Auth]]]]
HandlerFn = Callable[[str], Awaitable[str]]


@dataclass
class ImageOutcome:
    image: str
    policy: str
    result: str = ""
    reason: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"image": self.image, "policy": self.policy, "result": self.result}
        if self.reason:
            d["reason"] = self.reason
        d["seconds"] = round(self.seconds, 3)
        return d


@dataclass
class PodOutcome:
    pod: str
    uid: str
    seen_at: float
    images: list[ImageOutcome] = field(default_factory=list)
    result: str = "pending"
    ready_seconds: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "uid": self.uid,
            "seenAt": self.seen_at,
            "result": self.result,
            "readySeconds": None if self.ready_seconds is None else round(self.ready_seconds, 3),
            "images": [i.to_json() for i in self.images],
        }


def pod_result(images: Sequence[ImageOutcome]) -> str:
    ok = [i for i in images if i.result in (PULLED, PRESENT)]
    bad = [i for i in images if i.result == FAILED]
    if not bad and len(ok) + sum(i.result == SKIPPED_POLICY for i in images) == len(images):
        return "ready"
    return "failed" if not ok else "partial"


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON_CHARS else line[: MAX_REASON_CHARS - 3] + "..."


class PodPuller:
    def __init__(
        self,
        *,
        pull: PullFn,
        present: PresentFn,
        metrics: Any,
        concurrency: int = 4,
        slots: PullSlots | None = None,
        credentials: Credentials | None = None,
        secrets: SecretsFn | None = None,
        handler: HandlerFn | None = None,
        disk: DiskCheck | None = None,
        log_dir: str = "/var/log/pods",
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self._pull = pull
        self._present = present
        self.metrics = metrics
        self.slots = slots if slots is not None else PullSlots(concurrency)
        self.credentials = credentials
        self._secrets = secrets
        self._handler = handler
        self._disk = disk
        self.log_dir = log_dir
        self._clock = clock
        self._on_change = on_change
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._shared: dict[tuple[str, str, str], asyncio.Future[tuple[str, str]]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.recent: deque[PodOutcome] = deque(maxlen=RECENT_PODS)
        self.handled = 0

    # --- pods -------------------------------------------------------------------------------
    def submit(self, pod: PodInfo) -> bool:
        """Start on a Pending pod not handled before; False if there is nothing to do. Its images take
        their places in line for pull slots now, in the pod's order."""
        if not pod.pending or not pod.uid or pod.uid in self._seen or not pod.images:
            return False
        self._seen[pod.uid] = None
        while len(self._seen) > SEEN_PODS:
            self._seen.popitem(last=False)
        ticket = self.slots.ticket()
        places = [
            None if img.policy == NEVER else self.slots.queue((ticket, i)) for i, img in enumerate(pod.images)
        ]
        task = asyncio.ensure_future(self._handle(pod, places, self._clock(), time.time()))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def wait_idle(self) -> None:
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._disk is not None:
            await self._disk.close()

    async def _handle(self, pod: PodInfo, places: list[Place | None], t0: float, seen: float) -> None:
        try:
            await self._handle_pod(pod, places, t0, seen)
        finally:
            for place in places:
                if place is not None:
                    place.release()

    async def _handle_pod(self, pod: PodInfo, places: list[Place | None], t0: float, seen: float) -> None:
        out = PodOutcome(pod.ref, pod.uid, seen, [ImageOutcome(i.image, i.policy) for i in pod.images])
        self.recent.append(out)
        secret_auths: list[dict[str, Auth]] = []
        if pod.pull_secrets and self._secrets is not None:
            try:
                secret_auths = await self._secrets(pod.namespace, pod.pull_secrets)
            except Exception as e:  # the API server went away: pull without them (public images work)
                event(log, "pull secrets not read", level=30, pod=pod.ref, error=_short(str(e)))
        handler = ""
        if pod.runtime_class and self._handler is not None:
            try:
                handler = await self._handler(pod.runtime_class)
            except Exception as e:
                event(log, "runtime class not read", level=30, pod=pod.ref, error=_short(str(e)))
        sandbox = self._sandbox_config(pod)
        # one task per image; their places in line for pull slots were taken in the pod's order
        tasks = [
            asyncio.ensure_future(self._image(pod, img, o, secret_auths, handler, sandbox, place))
            for img, o, place in zip(pod.images, out.images, places, strict=True)
        ]
        await asyncio.gather(*tasks)
        out.result = pod_result(out.images)
        out.ready_seconds = self._clock() - t0
        self.handled += 1
        m = self.metrics
        m.pod_pulls_pods.labels(result=out.result).inc()
        if out.result == "ready":
            m.pod_images_ready.observe(out.ready_seconds)
        event(
            log,
            "pod images",
            origin="pod",
            pod=pod.ref,
            uid=pod.uid,
            result=out.result,
            seconds=round(out.ready_seconds, 3),
            images={o.image: o.result for o in out.images},
        )
        if self._on_change is not None:
            self._on_change()

    def _sandbox_config(self, pod: PodInfo) -> pb.PodSandboxConfig:
        """What the kubelet would put in PullImageRequest.sandbox_config, as far as it is known
        before the sandbox exists: metadata, labels (with the kubelet's own), annotations, log dir."""
        from nodeagent.cri.gen import cri_api_pb2 as pb

        labels = dict(pod.labels)
        labels.update(
            {
                "io.kubernetes.pod.name": pod.name,
                "io.kubernetes.pod.namespace": pod.namespace,
                "io.kubernetes.pod.uid": pod.uid,
            }
        )
        return pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=pod.name, uid=pod.uid, namespace=pod.namespace, attempt=0),
            labels=labels,
            annotations=dict(pod.annotations),
            log_directory=f"{self.log_dir}/{pod.namespace}_{pod.name}_{pod.uid}",
        )

    # --- images -----------------------------------------------------------------------------
    def _auth_candidates(self, image: str, secret_auths: list[dict[str, Auth]]) -> list[Auth | None]:
        """Credentials in the kubelet's order: the pod's pull secrets, then the node's (credential
        provider plugins, docker config); anonymous when nothing matches."""
        out: list[Auth | None] = []
        for auths in secret_auths:
            key = best_match(list(auths), image)
            if key is not None:
                out.append(auths[key])
        if self.credentials is not None:
            try:
                found = self.credentials.lookup(image)
            except CredentialError as e:
                event(log, "credentials not available", level=30, image=image, error=str(e))
                found = None
            if found is not None:
                out.append(found)
        return out or [None]

    async def _image(
        self,
        pod: PodInfo,
        img: PodImage,
        o: ImageOutcome,
        secret_auths: list[dict[str, Auth]],
        handler: str,
        sandbox: pb.PodSandboxConfig,
        place: Place | None,
    ) -> None:
        t0 = self._clock()
        try:
            o.result, o.reason = await self._image_work(pod, img, secret_auths, handler, sandbox, place)
        except asyncio.CancelledError:
            o.result, o.reason = FAILED, "canceled"
            raise
        except Exception as e:
            o.result, o.reason = FAILED, _short(f"{type(e).__name__}: {e}")
            log.exception("pod image failed")
        finally:
            if place is not None:
                place.release()
            o.seconds = self._clock() - t0
            self.metrics.pod_pulls_images.labels(result=o.result or FAILED).inc()

    async def _image_work(
        self,
        pod: PodInfo,
        img: PodImage,
        secret_auths: list[dict[str, Auth]],
        handler: str,
        sandbox: pb.PodSandboxConfig,
        place: Place | None,
    ) -> tuple[str, str]:
        from nodeagent.cri.gen import cri_api_pb2 as pb
        from nodeagent.proxy.singleflight import pull_key

        if img.policy == NEVER or place is None:
            return SKIPPED_POLICY, "imagePullPolicy: Never"
        candidates = await asyncio.to_thread(self._auth_candidates, img.image, secret_auths)
        last: tuple[str, str] = (FAILED, "")
        for auth in candidates:
            req = pb.PullImageRequest(
                image=pb.ImageSpec(image=img.image, runtime_handler=handler),
                auth=pb.AuthConfig(**auth.cri_fields()) if auth is not None else None,
                sandbox_config=sandbox,
            )
            key = pull_key(req)
            shared = self._shared.get(key)
            if shared is None:
                fut: asyncio.Future[tuple[str, str]] = asyncio.get_running_loop().create_future()
                self._shared[key] = fut
                # after waiting for another pod's pull (place given back): in line again, same order
                mine = self.slots.queue(place.order) if place.released else place
                try:
                    await mine.wait()
                    last = await self._pull_one(img, req, auth)
                    fut.set_result(last)
                except BaseException as e:
                    fut.set_exception(e)
                    fut.exception()  # retrieved: a waiter may not exist
                    raise
                finally:
                    del self._shared[key]
                    mine.release()
            else:  # another pod's task does this pull: wait for it without holding a slot
                place.release()
                last = await asyncio.shield(shared)
            if last[0] != FAILED or "unauthorized" not in last[1]:
                return last
        return last

    async def _pull_one(self, img: PodImage, req: pb.PullImageRequest, auth: Auth | None) -> tuple[str, str]:
        from nodeagent.proxy.records import classify

        # the caller holds a pull slot
        if img.policy == IF_NOT_PRESENT:
            try:
                if await self._present(img.image):
                    return PRESENT, ""
            except Exception as e:  # cannot tell: the pull says what is wrong
                event(log, "image status failed", level=30, image=img.image, error=_short(str(e)))
        ticket = None
        if self._disk is not None:
            reason, ticket = await self._disk.check(img.image, auth)
            if reason:
                event(log, "pod image skipped", origin="pod", image=img.image, reason=reason)
                return SKIPPED_DISK, reason
        try:
            await self._pull(req.SerializeToString())
        except Exception as e:
            code_obj = getattr(e, "code", None)
            code = code_obj() if callable(code_obj) else code_obj
            name = getattr(code, "name", "UNKNOWN")
            details_obj = getattr(e, "details", "")
            details = details_obj() if callable(details_obj) else str(details_obj or e)
            if auth is not None:
                for s in auth.secrets():
                    details = details.replace(s, "***")
            return FAILED, _short(f"{classify(name, details)}: {details}")
        finally:
            if self._disk is not None:
                self._disk.done(ticket)
        return PULLED, ""

    def status(self) -> dict[str, Any]:
        return {
            "podsHandled": self.handled,
            "inProgress": len(self._tasks),
            "pullSlots": self.slots.status(),
            "recent": [p.to_json() for p in reversed(self.recent)],
        }


__all__ = ["ALWAYS", "IF_NOT_PRESENT", "NEVER", "PodPuller"]
