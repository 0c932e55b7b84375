"""The taint remover's decisions (pure) and its reconcile step against a stand-in for lightkube's
client (patch only). The real API server, RBAC and the scheduler:
tests/integration/test_karpenter_taint.py."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from lightkube import ApiError
from lightkube.models.meta_v1 import Status

from nodeagent.eks.taintremover import NONE, REMOVE, WAIT, TaintRemover, decide, removal_patch
from nodeagent.images.readiness import CONDITION_TYPE, TAINT_KEY

CREATED = "2026-12-06T10:00:00Z"
T0 = 1796551200.0  # CREATED as epoch seconds
OURS = {"key": TAINT_KEY, "effect": "NoSchedule"}
OTHER = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
KEEP = {"key": "example.com/dedicated", "value": "gpu", "effect": "NoExecute"}


def node(taints: list[dict[str, str]], status: str | None = None, rv: str = "7") -> dict[str, Any]:
    conds = [{"type": "Ready", "status": "False"}]
    if status is not None:
        conds.append(
            {"type": CONDITION_TYPE, "status": status, "reason": "R", "message": "1 of 1 missing: x"}
        )
    return {
        "metadata": {"name": "n1", "resourceVersion": rv, "creationTimestamp": CREATED},
        "spec": {"taints": taints},
        "status": {"conditions": conds},
    }


def test_created_epoch_matches() -> None:
    d = decide(node([OURS]), T0 + 10, 60)
    assert d.action == WAIT and d.due == T0 + 60


def test_removes_only_when_condition_true() -> None:
    assert decide(node([OURS], "True"), T0, 900).action == REMOVE
    for status in (None, "False", "Unknown"):
        d = decide(node([OURS], status), T0 + 899, 900)
        assert d.action == WAIT, status
    assert "1 of 1 missing: x" in decide(node([OURS], "False"), T0, 900).reason
    assert "no nodeagent.io/ImagesReady condition yet" in decide(node([OURS]), T0, 900).reason


def test_max_wait_bounds_the_taint_and_zero_waits_forever() -> None:
    d = decide(node([OURS], "False"), T0 + 900, 900)
    assert d.action == REMOVE and "--max-wait 900s passed" in d.reason
    d = decide(node([OURS], "False"), T0 + 10**6, 0)
    assert d.action == WAIT and d.due is None


def test_nothing_to_do_without_our_taint() -> None:
    assert decide(node([OTHER, KEEP], "True"), T0, 900).action == NONE
    assert decide(node([], None), T0 + 10**6, 900).action == NONE


def test_patch_keeps_every_other_taint_and_is_conditional_on_the_version() -> None:
    assert removal_patch(node([OTHER, OURS, KEEP], rv="42")) == {
        "metadata": {"resourceVersion": "42"},
        "spec": {"taints": [OTHER, KEEP]},
    }
    assert removal_patch(node([OURS]))["spec"] == {"taints": None}


class Client:
    def __init__(self, errors: list[int]) -> None:
        self.errors = errors
        self.patches: list[tuple[str, dict[str, Any]]] = []

    async def patch(self, res: Any, name: str, obj: dict[str, Any], *, patch_type: Any) -> None:
        self.patches.append((name, obj))
        if self.errors:
            code = self.errors.pop(0)
            raise ApiError(status=Status(code=code, message=f"answer {code}"))


def test_reconcile_conflict_waits_for_the_watch_errors_back_off_success_forgets() -> None:
    async def main() -> None:
        now = [T0]
        client = Client(errors=[409, 500, 500])
        r = TaintRemover(client, max_wait=900, clock=lambda: now[0], rng=lambda: 1.0)
        r.observe(node([OURS, KEEP], "True", rv="1"), False)
        await r.reconcile("n1")  # 409: nothing scheduled until the watch delivers a newer version
        assert "n1" not in r.due and r.errors == 0
        r.observe(node([OURS, KEEP], "True", rv="2"), False)
        assert r.due["n1"] == T0
        await r.reconcile("n1")  # 500: retry in 1 s
        assert r.due["n1"] == T0 + 1.0
        await r.reconcile("n1")  # 500 again: 2 s
        assert r.due["n1"] == T0 + 2.0 and r.errors == 2
        r.observe(node([OURS, KEEP], "True", rv="3"), False)  # a new version does not skip the backoff
        assert r.due["n1"] == T0 + 2.0
        await r.reconcile("n1")
        assert r.removed == 1 and "n1" not in r.pending and "n1" not in r.due
        assert [p[1]["metadata"]["resourceVersion"] for p in client.patches] == ["1", "2", "2", "3"]
        assert all(p[1]["spec"]["taints"] == [KEEP] for p in client.patches)

    asyncio.run(main())


def test_waiting_node_is_decided_again_at_its_deadline_and_untainted_nodes_are_dropped() -> None:
    async def main() -> None:
        now = [T0 + 5]
        client = Client(errors=[])
        r = TaintRemover(client, max_wait=60, clock=lambda: now[0])
        r.observe(node([OURS], "False"), False)
        await r.reconcile("n1")
        assert r.due["n1"] == T0 + 60 and client.patches == []
        now[0] = T0 + 60
        await r.reconcile("n1")
        assert len(client.patches) == 1 and r.removed == 1
        r.observe(node([OURS], None), False)
        r.observe(node([OTHER], None), False)  # someone else removed it: forgotten
        assert "n1" not in r.pending and "n1" not in r.due

    asyncio.run(main())


class Listing:
    def __init__(self, items: list[Any], rv: str) -> None:
        self.items, self.resourceVersion = items, rv

    async def __aiter__(self) -> Any:
        for i in self.items:
            yield i


class Cluster(Client):
    """list + watch + patch: one listed node without the condition, then a watch event with it True."""

    def __init__(self, listed: list[Any], events: list[tuple[str, Any]]) -> None:
        super().__init__(errors=[])
        self.listed, self.events = listed, events
        self.patched = asyncio.Event()

    def list(self, res: Any) -> Listing:
        return Listing(self.listed, "10")

    async def watch(self, res: Any, *, resource_version: str) -> Any:
        assert resource_version == "10"
        for e in self.events:
            yield e
        await asyncio.Event().wait()

    async def patch(self, res: Any, name: str, obj: dict[str, Any], *, patch_type: Any) -> None:
        await super().patch(res, name, obj, patch_type=patch_type)
        self.patched.set()


def test_run_lists_watches_and_removes_when_the_condition_turns_true() -> None:
    from lightkube.resources.core_v1 import Node

    async def main() -> None:
        client = Cluster(
            listed=[Node.from_dict(node([OURS, KEEP], "False", rv="5"))],
            events=[("MODIFIED", Node.from_dict(node([OURS, KEEP], "True", rv="11")))],
        )
        r = TaintRemover(client, max_wait=0)
        task = asyncio.create_task(r.run())
        await asyncio.wait_for(client.patched.wait(), 5)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        ((name, body),) = client.patches
        assert name == "n1" and body["metadata"]["resourceVersion"] == "11"
        assert body["spec"]["taints"] == [KEEP]

    asyncio.run(main())
