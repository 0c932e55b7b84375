"""CRI messages -> policy data, against a FAKE runtime object (real runtime.v1 messages)."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.eviction.inventory import Inventory, container_of, image_of, sandbox_image_from_status
from nodeagent.eviction.policy import Container, Image


class NotFound(Exception):
    code = SimpleNamespace(name="NOT_FOUND")


class FakeCri:
    def __init__(self) -> None:
        self.sandboxes = [pb.PodSandbox(id="sb1", state=0), pb.PodSandbox(id="sb2", state=1)]
        self.status_calls: list[str] = []
        self.status_error: dict[str, Exception] = {}

    async def list_images(self) -> list[Any]:
        return [
            pb.Image(
                id="sha256:" + "a" * 64, repo_tags=["r/x:v1"], repo_digests=["r/x@sha256:" + "b" * 64], size=7
            )
        ]

    async def list_containers(self) -> list[Any]:
        return [
            pb.Container(id="c1", image=pb.ImageSpec(image="r/x:v1"), image_ref="sha256:" + "a" * 64, state=1)
        ]

    async def list_pod_sandboxes(self) -> list[Any]:
        return list(self.sandboxes)

    async def pod_sandbox_status(self, sid: str, verbose: bool = False) -> Any:
        self.status_calls.append(sid)
        if sid in self.status_error:
            raise self.status_error[sid]
        return pb.PodSandboxStatusResponse(info={"info": json.dumps({"image": f"r/pause:{sid}"})})


def test_messages_become_policy_data() -> None:
    inv = Inventory(FakeCri())
    assert asyncio.run(inv.images()) == [
        Image("sha256:" + "a" * 64, ("r/x:v1",), ("r/x@sha256:" + "b" * 64,), 7, False)
    ]
    users = asyncio.run(inv.users())
    assert users == [
        Container("c1", "r/x:v1", "sha256:" + "a" * 64, "", True, "container"),
        Container("sb1", "r/pause:sb1", running=True, kind="sandbox"),
        Container("sb2", "r/pause:sb2", running=False, kind="sandbox"),
    ]


def test_sandbox_images_are_read_once_per_sandbox_and_forgotten_with_it() -> None:
    cri = FakeCri()
    inv = Inventory(cri)
    asyncio.run(inv.users())
    asyncio.run(inv.users())
    assert cri.status_calls == ["sb1", "sb2"]
    cri.sandboxes = [pb.PodSandbox(id="sb2", state=1)]
    asyncio.run(inv.users())
    cri.sandboxes.append(pb.PodSandbox(id="sb1", state=0))
    asyncio.run(inv.users())
    assert cri.status_calls == ["sb1", "sb2", "sb1"]


def test_a_sandbox_gone_since_the_list_is_skipped_other_errors_are_not() -> None:
    cri = FakeCri()
    cri.status_error["sb1"] = NotFound("gone")
    users = asyncio.run(Inventory(cri).users())
    assert [u.id for u in users] == ["c1", "sb2"]
    cri.status_error["sb1"] = RuntimeError("UNAVAILABLE")
    with pytest.raises(RuntimeError):
        asyncio.run(Inventory(cri).users())


@pytest.mark.parametrize(
    ("info", "want"),
    [
        ({}, ""),
        ({"info": "{bad"}, ""),
        ({"info": "[]"}, ""),
        ({"info": '{"image": 3}'}, ""),
        ({"info": '{"image": "p:1"}'}, "p:1"),
    ],
)
def test_sandbox_image_from_status(info: dict[str, str], want: str) -> None:
    assert sandbox_image_from_status(pb.PodSandboxStatusResponse(info=info)) == want


def test_container_without_image_spec() -> None:
    c = container_of(pb.Container(id="c", image_ref="sha256:" + "1" * 64, state=2))
    assert c == Container("c", "", "sha256:" + "1" * 64, "", False, "container")
    assert image_of(pb.Image(id="i")).pinned is False
