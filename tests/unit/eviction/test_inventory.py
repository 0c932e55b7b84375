"""CRI messages -> policy data, against the FAKE runtime (tests/unit/cri/fakes.py): real runtime.v1
messages."""

from __future__ import annotations

import asyncio

import pytest

from nodeagent.cri.client import CriError
from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.eviction.inventory import Inventory, container_of, image_of, sandbox_image_from_status
from nodeagent.eviction.policy import Container, Image
from tests.unit.cri.fakes import FakeRuntime, Plan


def runtime() -> FakeRuntime:
    """One image used by a running container; two sandboxes (ready, not ready) whose pause images
    PodSandboxStatus(verbose) names."""
    rt = FakeRuntime()
    rt.add_image("sha256:" + "a" * 64, 7, tags=["r/x:v1"], digests=["r/x@sha256:" + "b" * 64])
    rt.containers = [
        pb.Container(id="c1", image=pb.ImageSpec(image="r/x:v1"), image_ref="sha256:" + "a" * 64, state=1)
    ]
    rt.sandboxes = [pb.PodSandbox(id="sb1", state=0), pb.PodSandbox(id="sb2", state=1)]
    rt.sandbox_images = {"sb1": "r/pause:sb1", "sb2": "r/pause:sb2"}
    return rt


def status_calls(rt: FakeRuntime) -> list[str]:
    return [s.request for s in rt.calls("PodSandboxStatus")]


def test_messages_become_policy_data() -> None:
    inv = Inventory(runtime())
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
    rt = runtime()
    inv = Inventory(rt)
    asyncio.run(inv.users())
    asyncio.run(inv.users())
    assert status_calls(rt) == ["sb1", "sb2"]
    rt.sandboxes = [pb.PodSandbox(id="sb2", state=1)]
    asyncio.run(inv.users())
    rt.sandboxes.append(pb.PodSandbox(id="sb1", state=0))
    asyncio.run(inv.users())
    assert status_calls(rt) == ["sb1", "sb2", "sb1"]


def test_a_sandbox_gone_since_the_list_is_skipped_other_errors_are_not() -> None:
    rt = runtime()
    rt.gone.add("sb1")  # removed between ListPodSandbox and PodSandboxStatus
    users = asyncio.run(Inventory(rt).users())
    assert [u.id for u in users] == ["c1", "sb2"]
    rt.gone.clear()
    rt.plans["PodSandboxStatus"] = Plan(fail_times=1)  # UNAVAILABLE: the sandbox image is unknown
    with pytest.raises(CriError):
        asyncio.run(Inventory(rt).users())


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
