"""ContainerdImages against the in-process FAKE (tests/unit/cri/fakes.py): namespace header,
update masks, NOT_FOUND."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from nodeagent.cri.client import CriError
from nodeagent.cri.containerd_images import PINNED_LABEL, ContainerdImages
from nodeagent.cri.gen import containerd_images_pb2 as cpb
from nodeagent.cri.gen import containerd_types_pb2 as tpb
from tests.unit.cri.fakes import Plan, fake_runtime


def test_namespace_header_and_deadline_on_every_call() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["images.List"] = Plan(
                response=cpb.ListImagesResponse(images=[cpb.Image(name="reg.local/a:1")])
            )
            async with ContainerdImages(ep, namespace="k8s.io", timeout=4.0) as ci:
                imgs = await ci.list()
                await ci.get("reg.local/a:1")
                await ci.pin("reg.local/a:1")
            assert [i.name for i in imgs] == ["reg.local/a:1"]
            assert len(rt.seen) == 4  # pin reads the record first (its target goes with the update)
            for s in rt.seen:
                assert s.metadata.get("containerd-namespace") == "k8s.io"
                assert s.time_remaining is not None and 0 < s.time_remaining <= 4.5

    asyncio.run(main())


def test_set_labels_updates_only_named_labels() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            async with ContainerdImages(ep) as ci:
                await ci.set_labels("reg.local/a:1", {"b": "2", "a": None})
                await ci.pin("reg.local/a:1")
                await ci.set_labels("reg.local/a:1", {PINNED_LABEL: None})  # unpin
            u1, u2, u3 = rt.calls("images.Update")
            assert list(u1.request.update_mask.paths) == ["labels.a", "labels.b"]
            assert dict(u1.request.image.labels) == {"b": "2"}
            assert u1.request.image.name == "reg.local/a:1"
            assert dict(u2.request.image.labels) == {PINNED_LABEL: "pinned"}
            assert list(u3.request.update_mask.paths) == [f"labels.{PINNED_LABEL}"]
            assert dict(u3.request.image.labels) == {}

    asyncio.run(main())


def test_update_carries_the_current_target_and_a_missing_image_is_not_found() -> None:
    # containerd 2.x dereferences the request's target before applying the update mask
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            target = tpb.Descriptor(
                media_type="application/vnd.oci.image.index.v1+json", digest="sha256:ab", size=9
            )
            rt.plans["images.Get"] = Plan(
                response=cpb.GetImageResponse(image=cpb.Image(name="a:1", target=target))
            )
            async with ContainerdImages(ep) as ci:
                await ci.pin("a:1")
                (update,) = rt.calls("images.Update")
                assert update.request.image.target == target
                assert list(update.request.update_mask.paths) == [f"labels.{PINNED_LABEL}"]
                rt.plans["images.Get"] = Plan(fail_times=1, fail_code=grpc.StatusCode.NOT_FOUND)
                with pytest.raises(CriError) as ei:
                    await ci.pin("gone:1")
            assert ei.value.code == grpc.StatusCode.NOT_FOUND and "images.Update" in str(ei.value)
            assert len(rt.calls("images.Update")) == 1

    asyncio.run(main())


def test_get_missing_image_is_none_other_errors_raise() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            rt.plans["images.Get"] = Plan(fail_times=1, fail_code=grpc.StatusCode.NOT_FOUND)
            async with ContainerdImages(ep) as ci:
                assert await ci.get("nope:1") is None
                rt.plans["images.Get"] = Plan(fail_times=1, fail_code=grpc.StatusCode.INTERNAL)
                with pytest.raises(CriError) as ei:
                    await ci.get("x:1")
            assert "images.Get" in str(ei.value) and ep in str(ei.value)

    asyncio.run(main())


def test_bad_label_key_is_refused_before_any_call() -> None:
    async def main() -> None:
        async with fake_runtime() as (rt, ep):
            async with ContainerdImages(ep) as ci:
                with pytest.raises(ValueError):
                    await ci.set_labels("a:1", {"": "x"})
            assert rt.seen == []

    asyncio.run(main())
