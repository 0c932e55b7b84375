"""PodWatch's list/watch loop against a scripted stand-in for lightkube's AsyncClient (list and watch
only): resume from the last version after a dropped watch, list again after 410, back off on errors.
The real API server (restart included) is in tests/integration/test_pod_pulls.py."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from lightkube import ApiError
from lightkube.core.internal_models import meta_v1
from lightkube.models.core_v1 import Container, PodSpec, PodStatus
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Pod

from nodeagent.podpulls.kube import PodWatch
from nodeagent.podpulls.pods import PodInfo


def pod(name: str, rv: str, phase: str = "Pending") -> Pod:
    return Pod(
        metadata=ObjectMeta(name=name, namespace="default", uid=f"uid-{name}", resourceVersion=rv),
        spec=PodSpec(containers=[Container(name="c", image=f"r/{name}:1", imagePullPolicy="IfNotPresent")]),
        status=PodStatus(phase=phase),
    )


class Listing:
    def __init__(self, items: list[Pod], rv: str) -> None:
        self.items, self.resourceVersion = items, rv

    async def __aiter__(self) -> Any:
        for i in self.items:
            yield i


class Script:
    """lists: what each list returns; watches: per watch call, events then an exception (or None: end)."""

    def __init__(
        self, lists: list[tuple[list[Pod], str]], watches: list[tuple[list[Pod], BaseException | None]]
    ):
        self.lists, self.watches = lists, watches
        self.calls: list[tuple[str, Any]] = []

    def list(self, res: Any, *, namespace: str, fields: dict[str, str]) -> Listing:
        assert (namespace, fields) == ("*", {"spec.nodeName": "node-1"})
        self.calls.append(("list", None))
        items, rv = self.lists.pop(0)
        return Listing(items, rv)

    async def watch(self, res: Any, *, namespace: str, fields: dict[str, str], resource_version: str) -> Any:
        self.calls.append(("watch", resource_version))
        if not self.watches:
            await asyncio.Event().wait()  # quiet forever
        events, end = self.watches.pop(0)
        for p in events:
            yield "MODIFIED", p
        if end is not None:
            raise end


def gone() -> ApiError:
    return ApiError(status=meta_v1.Status(code=410, message="too old resource version"))


def test_resume_from_last_version_relist_on_410_and_back_off_on_errors() -> None:
    async def main() -> None:
        client = Script(
            lists=[([pod("a", "5")], "10"), ([pod("c", "30")], "31")],
            watches=[
                ([pod("b", "12")], ConnectionError("connection reset")),  # dropped: resume from 12
                ([], gone()),  # 410: list again, watch from the new list's version
                ([pod("d", "33")], None),
            ],
        )
        seen: list[PodInfo] = []
        states: list[tuple[bool, str]] = []
        sleeps: list[float] = []

        async def sleep(s: float) -> None:
            sleeps.append(s)

        w = PodWatch(
            client,
            "node-1",
            seen.append,
            lambda ok, err: states.append((ok, err)),
            sleep=sleep,
            rng=lambda: 1.0,
        )
        task = asyncio.ensure_future(w.run())
        for _ in range(200):
            if len(seen) == 4:
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [p.name for p in seen] == ["a", "b", "c", "d"]
        assert client.calls == [
            ("list", None),
            ("watch", "10"),
            ("watch", "12"),
            ("list", None),
            ("watch", "31"),
            ("watch", "33"),
        ]
        assert (False, "connection reset") in states and states[-1] == (True, "")
        assert sleeps == [1.0]  # one back-off, after the error; none after 410 (list at once)
        assert w.lists == 2

    asyncio.run(main())
