"""``nodeagent taint-remover``: lifts the opt-in startup taint once a node reports its images ready.

A node's own identity may not remove a taint from its Node (the NodeRestriction admission plugin), so
the startup taint ``nodeagent.io/images-not-ready:NoSchedule`` (rendered only with ``nodeagent userdata
--format karpenter --startup-taint``) needs a cluster identity. This controller runs as a Deployment
with its own service account whose ClusterRole allows exactly ``list``, ``watch`` and ``patch`` on
``nodes`` (``karpenter.remover_manifests``; the integration test shows each one is needed and that
``get``/``update`` are not granted).

It lists and watches every Node (relist after ``410 Gone``, bounded backoff on errors: PodWatch's
loop) and keeps the ones carrying the taint. For each, ``decide``:

- the Node condition ``nodeagent.io/ImagesReady`` (``nodeagent/images/readiness.py``, written by ``nodeagent
  run`` on the node) is ``True``: remove the taint;
- else, ``--max-wait`` after the Node was created (default 15m; ``0`` waits forever): remove it anyway
  and log why (a node without nodeagent, or whose images never arrive, still gets pods: never a taint
  that nothing removes);
- else wait for the next change of that Node (or the deadline).

Removal is a JSON merge patch of ``spec.taints`` holding every other taint unchanged, with the Node's
``metadata.resourceVersion`` as a precondition: when anything changed the Node in between, the API
server answers 409 and the newer version, delivered by the watch, is decided again. So the remover
never drops or resurrects another taint. A failed patch of one node is retried with backoff (1 s
doubling to 60 s) without holding up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nodeagent.images.readiness import CONDITION_TYPE, TAINT_KEY
from nodeagent.podpulls.kube import PodWatch
from nodeagent.util.log import event, get_logger

log = get_logger(__name__)

DEFAULT_MAX_WAIT = 900.0
RETRY_INITIAL = 1.0
RETRY_MAX = 60.0

REMOVE = "remove"
WAIT = "wait"
NONE = "none"


@dataclass(frozen=True)
class Decision:
    action: str  # REMOVE | WAIT | NONE
    reason: str
    due: float | None = None  # WAIT: when max-wait runs out (epoch seconds); None = no deadline


def _created(node: Mapping[str, Any]) -> float | None:
    stamp = (node.get("metadata") or {}).get("creationTimestamp")
    if not stamp:
        return None
    try:
        return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def has_taint(node: Mapping[str, Any]) -> bool:
    return any(t.get("key") == TAINT_KEY for t in (node.get("spec") or {}).get("taints") or [])


def decide(node: Mapping[str, Any], now: float, max_wait: float) -> Decision:
    """What to do with ``node`` (the API object as a dict) at ``now`` (pure)."""
    if not has_taint(node):
        return Decision(NONE, f"no {TAINT_KEY} taint")
    cond = next(
        (c for c in (node.get("status") or {}).get("conditions") or [] if c.get("type") == CONDITION_TYPE),
        None,
    )
    if cond is not None and cond.get("status") == "True":
        return Decision(REMOVE, f"{CONDITION_TYPE} is True ({cond.get('reason', '')})")
    seen = (
        f"{CONDITION_TYPE} is {cond.get('status')}: {cond.get('message', '')}"
        if cond is not None
        else f"no {CONDITION_TYPE} condition yet"
    )
    created = _created(node)
    if max_wait > 0 and created is not None:
        due = created + max_wait
        if now >= due:
            return Decision(REMOVE, f"--max-wait {max_wait:g}s passed since registration; {seen}")
        return Decision(WAIT, seen, due)
    return Decision(WAIT, seen)


def removal_patch(node: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch removing the taint and keeping every other one, valid only against the
    version of the Node it was computed from."""
    kept = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("key") != TAINT_KEY]
    return {
        "metadata": {"resourceVersion": (node.get("metadata") or {}).get("resourceVersion")},
        "spec": {"taints": kept or None},
    }


class WatchRefused(Exception):
    """The API server refused the watch request (an HTTP error status, e.g. 403 without ``watch``)."""


class NodeWatch(PodWatch):
    """PodWatch's list/watch/backoff loop over every Node; ``on_node(node_dict, deleted)``."""

    def __init__(
        self,
        client: Any,
        on_node: Callable[[dict[str, Any], bool], None],
        on_state: Callable[[bool, str], None],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        super().__init__(client, "", lambda _: None, on_state, sleep=sleep)
        self.on_node = on_node

    async def _list(self) -> None:
        from lightkube.resources.core_v1 import Node

        self.lists += 1
        listing = self.client.list(Node)
        nodes = [n async for n in listing]
        self.resource_version = listing.resourceVersion
        for n in nodes:
            self.on_node(n.to_dict(), False)

    async def _watch(self) -> None:
        from lightkube.resources.core_v1 import Node

        self.watches += 1
        try:
            async for kind, obj in self.client.watch(Node, resource_version=self.resource_version):
                rv = obj.metadata.resourceVersion if obj.metadata is not None else None
                if rv:
                    self.resource_version = rv
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self.on_node(obj.to_dict(), kind == "DELETED")
        except Exception as e:
            # lightkube raises the HTTP error of a refused watch with a URL, not the API server's reason
            response = getattr(e, "response", None)
            if response is None or getattr(response, "status_code", None) is None:
                raise
            raise WatchRefused(f"watch nodes: API server answered {response.status_code}") from None


class TaintRemover:
    def __init__(
        self,
        client: Any,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.client = client
        self.max_wait = max_wait
        self._clock = clock
        self._rng = rng
        self.pending: dict[str, dict[str, Any]] = {}  # tainted nodes, latest version seen
        self.due: dict[str, float] = {}  # node -> when to decide again without a change
        self.backoff: dict[str, float] = {}
        self.waiting_reason: dict[str, str] = {}
        self.removed = 0
        self.errors = 0
        self._wake = asyncio.Event()
        self.watch = NodeWatch(client, self.observe, self._on_state, sleep=sleep)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.watch.run())
            tg.create_task(self._reconcile_loop())

    def _on_state(self, ok: bool, error: str) -> None:
        if not ok:
            event(log, "taint remover: listing or watching nodes failed", level=30, error=error)

    def observe(self, node: dict[str, Any], deleted: bool) -> None:
        name = str((node.get("metadata") or {}).get("name") or "")
        if not name:
            return
        if deleted or not has_taint(node):
            for d in (self.pending, self.due, self.backoff, self.waiting_reason):
                d.pop(name, None)
            return
        self.pending[name] = node
        if name not in self.backoff:  # a new version is decided at once (after a failure: at its retry)
            self.due[name] = self._clock()
        self._wake.set()

    async def _reconcile_loop(self) -> None:
        while True:
            self._wake.clear()  # first: a node observed while we reconcile below sets it again
            now = self._clock()
            for name in [n for n, at in self.due.items() if at <= now]:
                await self.reconcile(name)
            later = [at for at in self.due.values() if at > self._clock()]
            timeout = max(0.05, min(later) - self._clock()) if later else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    async def reconcile(self, name: str) -> None:
        node = self.pending.get(name)
        if node is None:
            self.due.pop(name, None)
            return
        now = self._clock()
        d = decide(node, now, self.max_wait)
        if d.action == NONE:
            self.due.pop(name, None)
            return
        if d.action == WAIT:
            if self.waiting_reason.get(name) != d.reason:
                event(log, "taint remover: waiting", node=name, reason=d.reason)
                self.waiting_reason[name] = d.reason
            if d.due is None:
                self.due.pop(name, None)
            else:
                self.due[name] = d.due
            return
        await self._remove(name, node, d.reason)

    async def _remove(self, name: str, node: dict[str, Any], reason: str) -> None:
        from lightkube import ApiError
        from lightkube.resources.core_v1 import Node
        from lightkube.types import PatchType

        try:
            await self.client.patch(Node, name, removal_patch(node), patch_type=PatchType.MERGE)
        except ApiError as e:
            code = e.status.code if e.status is not None else 0
            if code == 409:  # the Node changed since: the watch brings the newer version
                self.due.pop(name, None)
                return
            if code == 404:
                self.observe(node, True)
                return
            self._failed(name, f"API server answered {code}: {' '.join(str(e).split())[:300]}")
            return
        except (asyncio.CancelledError, KeyboardInterrupt):
            raise
        except Exception as e:
            self._failed(name, " ".join(str(e).split())[:300] or type(e).__name__)
            return
        self.removed += 1
        # removed by --max-wait rather than by the node's own report: worth a warning
        level = 20 if reason.startswith(CONDITION_TYPE) else 30
        event(log, "taint remover: taint removed", level=level, node=name, taint=TAINT_KEY, reason=reason)
        for d in (self.pending, self.due, self.backoff, self.waiting_reason):
            d.pop(name, None)

    def _failed(self, name: str, error: str) -> None:
        self.errors += 1
        delay = min(self.backoff.get(name, RETRY_INITIAL / 2) * 2, RETRY_MAX)
        self.backoff[name] = delay
        self.due[name] = self._clock() + delay * (0.5 + 0.5 * self._rng())
        event(
            log, "taint remover: removing the taint failed", level=30, node=name, error=error, retry_in=delay
        )
