"""Pod-aware pulls (``podPulls``): every image of a pod bound to this node, pulled at once.

The kubelet pulls a pod's images one after another, each just before its container starts, and only
after the pod sandbox exists. nodeagent watches the pods bound to the node with the node's own
identity (``kube.py``) and, when a pod appears, pulls all its images at once through the proxy's
single-flight table (``puller.py``): the kubelet's pull of an image nodeagent is already pulling joins
it, and its pull of an image already present is a cheap resolve. docs/pod-pulls.md has the details.

``PodPulls`` is the daemon worker (``nodeagent/commands/run.py`` wires it): it waits for a usable
kubeconfig, learns the node name, then watches for good; the API server being down only delays pod
pulls: the proxy, eviction and metrics never wait for it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from nodeagent.util.log import event, get_logger

if TYPE_CHECKING:
    from nodeagent.config.model import Config
    from nodeagent.eviction.loop import EvictionLoop
    from nodeagent.run.daemon import Daemon
    from nodeagent.util.paths import Paths

log = get_logger(__name__)

KUBECONFIG_RETRY = 10.0  # a missing or broken kubeconfig is looked at again this often
IDENTITY_RETRY_MAX = 30.0


def _import_client() -> None:
    import lightkube.resources.authentication_v1
    import lightkube.resources.core_v1
    import lightkube.resources.node_v1  # noqa: F401


class PodPulls:
    def __init__(
        self, config: Config, paths: Paths, daemon: Daemon, evictor: EvictionLoop | None = None
    ) -> None:
        self.config = config
        self.settings = config.pod_pulls
        self.paths = paths
        self.daemon = daemon
        self.evictor = evictor  # the eviction loop: what it could free (the disk check); None = no check
        self.kubeconfig = paths.host(self.settings.kubeconfig)
        self.node = self.settings.node_name
        self.state = "starting"
        self.error = ""
        self.api_ok: bool | None = None
        self.api_changed_at: float | None = None
        self.puller: Any = None
        self.watch: Any = None
        self._client: Any = None

    # --- the worker ---------------------------------------------------------------------------
    async def run(self) -> None:
        await self._wait_for_kubeconfig()
        # The client library takes ~0.5 s to import: in a thread, so the proxy keeps answering meanwhile.
        await asyncio.to_thread(_import_client)
        from nodeagent.podpulls import kube

        try:
            self._client = await self._load_client()
            if not self.node:
                self.node = await self._identity()
            self.puller = self._make_puller()
            self.watch = kube.PodWatch(self._client, self.node, self.puller.submit, self._on_api)
            self._set("watching", "")
            event(log, "pod pulls watching", node=self.node, kubeconfig=str(self.kubeconfig))
            await self.watch.run()
        finally:
            if self.puller is not None:
                await self.puller.close()
            if self._client is not None:
                await asyncio.shield(self._close_client())

    async def _close_client(self) -> None:
        try:
            await self._client.close()
        except Exception:
            log.exception("closing the Kubernetes client failed")

    async def _wait_for_kubeconfig(self) -> None:
        """Nodes write the kubelet's kubeconfig at boot (nodeadm), maybe after nodeagent started."""
        if self.kubeconfig.exists():
            return
        self._set("waiting", f"{self.kubeconfig}: not found")
        event(log, "pod pulls: waiting for kubeconfig", kubeconfig=str(self.kubeconfig))
        while not self.kubeconfig.exists():  # noqa: ASYNC110 (a file, no event to wait on)
            await asyncio.sleep(KUBECONFIG_RETRY)

    async def _load_client(self) -> Any:
        from nodeagent.podpulls.kube import KubeconfigError, load_client

        last = ""
        while True:
            try:
                return load_client(self.kubeconfig)
            except KubeconfigError as e:
                msg = str(e)
                missing = not self.kubeconfig.exists()
                self._set("waiting" if missing else "error", msg)
                if msg != last:  # one line per distinct problem, not one every retry
                    event(
                        log,
                        "pod pulls: kubeconfig not usable"
                        if not missing
                        else "pod pulls: waiting for kubeconfig",
                        level=40 if not missing else 20,
                        error=msg,
                    )
                    last = msg
            await asyncio.sleep(KUBECONFIG_RETRY)

    async def _identity(self) -> str:
        from nodeagent.podpulls.kube import IdentityError, node_name

        delay, last = 1.0, ""
        while True:
            try:
                name = await node_name(self._client)
                self._on_api(True, "")
                return name
            except IdentityError as e:
                msg, level = str(e), 40
                self._set("error", msg)
            except (asyncio.CancelledError, KeyboardInterrupt):
                raise
            except Exception as e:
                msg, level = " ".join(str(e).split())[:300] or type(e).__name__, 30
                self._on_api(False, msg)
            if msg != last:
                event(log, "pod pulls: node name not known yet", level=level, error=msg)
                last = msg
            await asyncio.sleep(delay)
            delay = min(delay * 2, IDENTITY_RETRY_MAX)

    def _make_puller(self) -> Any:
        from nodeagent.images.credentials import CredentialError, Credentials
        from nodeagent.podpulls import kube
        from nodeagent.podpulls.puller import PodPuller
        from nodeagent.proxy.records import ORIGIN_POD

        daemon = self.daemon
        try:
            credentials: Credentials | None = Credentials.from_config(self.paths, self.config.images)
        except CredentialError as e:
            event(log, "pod pulls: node credentials not available", level=30, error=str(e))
            credentials = None

        async def pull(request: bytes) -> bytes:
            proxy = daemon.proxy
            if proxy is not None:
                out: bytes = await proxy.pull(request, origin=ORIGIN_POD)
                return out
            from nodeagent.cri.gen import cri_api_pb2 as pb

            req = pb.PullImageRequest.FromString(request)
            ref = await daemon.cri.pull_image(
                req.image.image, auth=req.auth, sandbox_config=req.sandbox_config, timeout=3600.0, retry=False
            )
            return bytes(pb.PullImageResponse(image_ref=ref).SerializeToString())

        async def present(image: str) -> bool:
            return bool((await daemon.cri.image_status(image)).HasField("image"))

        client = self._client

        async def secrets(namespace: str, names: Any) -> Any:
            return await kube.pull_secret_auths(client, namespace, names)

        async def handler(name: str) -> str:
            return await kube.runtime_handler(client, name)

        disk = None
        if self.evictor is not None:
            from nodeagent.podpulls.disk import DiskGuard

            disk = DiskGuard(self.evictor, self.paths.hosts_dir(self.config.containerd.hosts_dir))
        return PodPuller(
            pull=pull,
            present=present,
            metrics=daemon.metrics,
            slots=daemon.pull_slots,  # shared with prefetch through the proxy (podPulls.concurrency)
            credentials=credentials,
            secrets=secrets,
            handler=handler,
            disk=disk,
            on_change=daemon.mark_status_dirty,
        )

    # --- state --------------------------------------------------------------------------------
    def _set(self, state: str, error: str) -> None:
        if (state, error) != (self.state, self.error):
            self.state, self.error = state, error
            self.daemon.mark_status_dirty()

    def _on_api(self, ok: bool, error: str) -> None:
        if ok != self.api_ok:
            if ok:
                event(log, "pod pulls: API server answering", node=self.node)
            else:
                event(log, "pod pulls: API server not answering", level=30, node=self.node, error=error)
            self.api_ok = ok
            self.api_changed_at = time.time()
            self.daemon.mark_status_dirty()
        if self.state in ("watching", "disconnected"):
            self._set("watching" if ok else "disconnected", error)

    def status(self) -> dict[str, Any]:
        """The ``podPulls`` section of the status file: state, node, API server, the last pods handled
        (names, images and outcomes; never credentials). ``error`` (a bad kubeconfig, the API server
        not answering) makes ``nodeagent status`` report a problem; waiting for a kubeconfig does not."""
        waiting = self.state == "waiting"
        out: dict[str, Any] = {
            "state": self.state,
            "node": self.node,
            "kubeconfig": str(self.kubeconfig),
            "apiServerOk": self.api_ok,
            "error": "" if waiting else self.error,
        }
        if waiting:
            out["waiting"] = self.error
        if self.watch is not None:
            out["lists"] = self.watch.lists
            out["watches"] = self.watch.watches
        if self.puller is not None:
            out.update(self.puller.status())
        out["summary"] = self._summary(out)
        return out

    @staticmethod
    def _summary(st: dict[str, Any]) -> list[str]:
        api = {True: "answering", False: "NOT ANSWERING", None: "not contacted yet"}[st["apiServerOk"]]
        lines = [f"{st['state']}; node {st['node'] or '?'}; API server {api}; {st['kubeconfig']}"]
        if st.get("error") or st.get("waiting"):
            lines.append(f"  {st.get('error') or st.get('waiting')}")
        recent = st.get("recent") or []
        if recent:
            lines.append(
                f"pods handled {st.get('podsHandled', 0)}, in progress {st.get('inProgress', 0)}; last:"
            )
        for p in recent[:10]:
            secs = p.get("readySeconds")
            took = f"{secs:.1f}s" if isinstance(secs, int | float) else "-"
            lines.append(f"  {p['pod']}: {p['result']} in {took}")
            for i in p.get("images", []):
                reason = f" ({i['reason']})" if i.get("reason") else ""
                lines.append(f"    {i['result']:<15} {i['image']}{reason}")
        return lines
