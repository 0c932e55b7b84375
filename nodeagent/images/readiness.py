"""Image readiness on the Node object: the ``nodeagent.io/ImagesReady`` condition (``images.readyCondition``).

The signal behind the opt-in Karpenter startup taint (docs/eks.md, "Image readiness"). The node's own
identity may not remove a taint from its Node (NodeRestriction), but it may set conditions in its
Node's status. So ``nodeagent run`` reports

    type: nodeagent.io/ImagesReady
    status: "True"  | "False"
    reason: RequiredImagesPresent | RequiredImagesMissing
    message: which required images are missing (at most MAX_MESSAGE characters)

and ``nodeagent taint-remover`` (``nodeagent/eks/taintremover.py``, a Deployment with its own service
account) removes the startup taint ``nodeagent.io/images-not-ready`` from a Node once the condition
is True. The same condition suits the Kubernetes node-readiness-controller's NodeReadinessRule.

``ImagesReady`` is the daemon worker: it waits for the kubeconfig (``podPulls.kubeconfig``), learns
the node name, then checks the ``required: true`` images of ``images.prefetch`` through CRI and pulls
the missing ones (prefetch's code: credentials, retries, ``images.prefetchBudget`` per round), and
writes the condition whenever it changes (images are looked at every 30 s, every 5 s while some are
missing; it is rewritten unchanged every 5 min, so a re-created Node gets it back, with its
``lastTransitionTime`` kept). Before the kubelet registered the Node the write gets 404: it tries
again with bounded backoff (1 s doubling to 10 s), so the condition lands seconds after registration.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.config.model import Config
    from nodeagent.run.daemon import Daemon
    from nodeagent.util.paths import Paths

log = get_logger(__name__)

CONDITION_TYPE = "nodeagent.io/ImagesReady"
TAINT_KEY = "nodeagent.io/images-not-ready"
TAINT_EFFECT = "NoSchedule"
REASON_PRESENT = "RequiredImagesPresent"
REASON_MISSING = "RequiredImagesMissing"
MAX_MESSAGE = 1024
KUBECONFIG_RETRY = 10.0
WRITE_RETRY_INITIAL = 1.0
WRITE_RETRY_MAX = 10.0
RECHECK = 30.0  # images are looked at again this often once the condition is written
HEARTBEAT = 300.0  # the condition is rewritten this often unchanged (a re-created Node gets it back)
RECHECK_MISSING = 5.0  # ... and this often while some are missing (each round pulls them again)


def _stamp(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def condition(
    missing: Sequence[str], required: int, now: datetime, since: datetime | None = None
) -> dict[str, str]:
    """The Node condition for ``missing`` of ``required`` images (pure); ``since``: when the status
    last changed (default ``now``)."""
    if missing:
        message = f"{len(missing)} of {required} required image(s) missing: " + ", ".join(missing)
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        status, reason = "False", REASON_MISSING
    else:
        status, reason = "True", REASON_PRESENT
        message = f"all {required} required image(s) present" if required else "no required images"
    return {
        "type": CONDITION_TYPE,
        "status": status,
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": _stamp(now),
        "lastTransitionTime": _stamp(since or now),
    }


class ImagesReady:
    """The daemon worker (wired in ``nodeagent/commands/run.py``)."""

    def __init__(
        self,
        config: Config,
        paths: Paths,
        daemon: Daemon,
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._sleep = sleep
        self._now = now
        self.config = config
        self.paths = paths
        self.daemon = daemon
        self.kubeconfig = paths.host(config.pod_pulls.kubeconfig)
        self.node = config.pod_pulls.node_name
        self.required = [p for p in config.images.prefetch if p.required]
        self.state = "starting"
        self.error = ""
        self.missing: list[str] | None = None
        self.written: tuple[str, str] | None = None  # (status, message) last written to the Node
        self.written_at: float | None = None
        self.since: datetime | None = None  # when the written status last changed
        self._client: Any = None

    async def run(self) -> None:
        try:
            await self._connect()
            while True:
                missing = await self._check_images()
                stale = self.written_at is None or time.time() - self.written_at >= HEARTBEAT
                if stale or self.written != self._key(missing):
                    await self._write(missing)
                await self._sleep(RECHECK_MISSING if missing else RECHECK)
        finally:
            if self._client is not None:
                await asyncio.shield(self._close())

    async def _close(self) -> None:
        try:
            await self._client.close()
        except Exception:
            log.exception("closing the Kubernetes client failed")

    async def _connect(self) -> None:
        from nodeagent.podpulls import kube

        last = ""
        while self._client is None:
            msg = ""
            if not self.kubeconfig.exists():  # nodeadm writes it at boot, maybe after we started
                self._set("waiting", f"{self.kubeconfig}: not found")
            else:
                await asyncio.to_thread(_import_client)  # ~0.5 s of imports, off the loop
                try:
                    self._client = kube.load_client(self.kubeconfig)
                except kube.KubeconfigError as e:
                    msg = str(e)
                    self._set("error", msg)
            if msg and msg != last:
                event(log, "images ready: kubeconfig not usable", level=40, error=msg)
                last = msg
            if self._client is None:
                await self._sleep(KUBECONFIG_RETRY)
        delay = WRITE_RETRY_INITIAL
        while not self.node:
            try:
                self.node = await kube.node_name(self._client)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as e:
                msg = _short(e)
                self._set("error", msg)
                if msg != last:
                    event(log, "images ready: node name not known yet", level=30, error=msg)
                    last = msg
                await self._sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX * 3)
        self._set("checking", "")

    async def _check_images(self) -> list[str]:
        """The required images still missing after one round of prefetch (present ones cost one
        ImageStatus each)."""
        if not self.required:
            self.missing = []
            return []
        from nodeagent.images.credentials import CredentialError, Credentials
        from nodeagent.images.prefetch import Prefetcher

        images = self.config.images
        try:
            credentials: Credentials | None = Credentials.from_config(self.paths, images)
        except CredentialError as e:
            event(log, "images ready: node credentials not available", level=30, error=str(e))
            credentials = None
        report = await Prefetcher(
            self.daemon.cri,
            self.required,
            concurrency=images.prefetch_concurrency,
            budget=images.prefetch_budget,
            credentials=credentials,
        ).run()
        missing = [o.image for o in report.missing_required]
        if missing != self.missing:
            event(log, "images ready: required images", missing=len(missing), required=len(self.required))
            self.missing = missing
            self.daemon.mark_status_dirty()
        return missing

    def _key(self, missing: Sequence[str]) -> tuple[str, str]:
        c = condition(missing, len(self.required), self._now())
        return c["status"], c["message"]

    async def _write(self, missing: Sequence[str]) -> None:
        """Write the condition; retry (bounded backoff) until the Node exists and accepts it."""
        from nodeagent.podpulls import kube

        delay, last = WRITE_RETRY_INITIAL, ""
        while True:
            now = self._now()
            status = "False" if missing else "True"
            since = self.since if self.written is not None and self.written[0] == status else now
            cond = condition(missing, len(self.required), now, since)
            try:
                await kube.set_node_condition(self._client, self.node, cond)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as e:
                msg = _short(e)
                # 404 until the kubelet registered the Node: waiting, not an error
                waiting = getattr(getattr(e, "status", None), "code", 0) == 404
                self._set("waiting" if waiting else "error", msg)
                if msg != last:
                    event(
                        log, "images ready: condition not written yet", level=20 if waiting else 30, error=msg
                    )
                    last = msg
                await self._sleep(delay)
                delay = min(delay * 2, WRITE_RETRY_MAX)
                continue
            changed = self.written is None or self.written[0] != cond["status"]
            self.written, self.written_at, self.since = (cond["status"], cond["message"]), time.time(), since
            self._set("reported", "")
            if not changed:
                return  # a heartbeat or a new message: not worth a log line
            event(
                log,
                "images ready: condition written",
                node=self.node,
                status=cond["status"],
                reason=cond["reason"],
            )
            return

    def _set(self, state: str, error: str) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error = state, error
            self.daemon.mark_status_dirty()

    def status(self) -> dict[str, Any]:
        """The ``imagesReady`` section of the status file. Waiting for the kubeconfig or for the Node
        to be registered is not a problem; a bad kubeconfig or a refused write is."""
        waiting = self.state == "waiting"
        out: dict[str, Any] = {
            "state": self.state,
            "node": self.node,
            "condition": CONDITION_TYPE,
            "reported": self.written[0] if self.written else None,
            "reportedAt": self.written_at,
            "required": len(self.required),
            "missing": self.missing,
            "error": "" if waiting else self.error,
        }
        if waiting:
            out["waiting"] = self.error
        reported = {None: "not written yet", "True": "True", "False": "False"}[out["reported"]]
        lines = [f"{self.state}; node {self.node or '?'}; {CONDITION_TYPE} {reported}"]
        if self.missing:
            lines.append(f"  missing: {', '.join(self.missing)}")
        if self.error:
            lines.append(f"  {self.error}")
        out["summary"] = lines
        return out


def _import_client() -> None:
    import lightkube.resources.authentication_v1
    import lightkube.resources.core_v1  # noqa: F401


def _short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__
