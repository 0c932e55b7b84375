"""PodPuller: which images of a pod are pulled, how, with which credentials, and what is reported.

The pull and ImageStatus functions here send to the FAKE runtime (tests/unit/cri/fakes.py) what the
proxy would send upstream (the single-flight behaviour itself is tested on the proxy, and everything
together with real components in tests/integration/test_pod_pulls.py)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from nodeagent.cri.gen import cri_api_pb2 as pb
from nodeagent.images.credentials import Auth, Credentials, DockerConfig
from nodeagent.podpulls.pods import PodInfo, default_policy, images_of
from nodeagent.podpulls.puller import PodPuller
from nodeagent.run.metrics import Metrics
from tests.unit.cri.fakes import FakeRuntime, digest


def pod(images: list[tuple[str, str, str | None]], **kw: Any) -> PodInfo:
    base: dict[str, Any] = {"uid": "u1", "namespace": "ns", "name": "web", "phase": "Pending"}
    base.update(kw)
    return PodInfo(images=images_of(images), **base)


def runtime(present: set[str] = frozenset(), delay: float = 0.05) -> FakeRuntime:  # type: ignore[assignment]
    rt = FakeRuntime(pull_delay=delay)
    for n, image in enumerate(sorted(present)):
        rt.add_image(digest(n), 1000, tags=[image])
    return rt


def puller(rt: FakeRuntime, **kw: Any) -> tuple[PodPuller, Metrics]:
    """A PodPuller whose pulls go to the FAKE runtime the way the proxy's ``ImageProxy.pull`` sends
    them upstream (a PullImageRequest in, a PullImageResponse out)."""

    async def pull(request: bytes) -> bytes:
        req = pb.PullImageRequest.FromString(request)
        auth = req.auth if req.HasField("auth") else None
        ref = await rt.pull_image(req.image.image, auth=auth, sandbox_config=req.sandbox_config)
        return pb.PullImageResponse(image_ref=ref).SerializeToString()

    async def present(image: str) -> bool:
        return rt.find(image) is not None

    m = Metrics()
    return PodPuller(pull=pull, present=present, metrics=m, concurrency=kw.pop("concurrency", 4), **kw), m


def count(m: Metrics, name: str, **labels: str) -> float:
    return m.registry.get_sample_value(name, labels) or 0.0


def test_images_in_pod_order_once_each_strongest_policy_and_defaults() -> None:
    imgs = images_of(
        [
            ("init:a", "r/x:1", "IfNotPresent"),
            ("sidecar:s", "r/y:1", None),
            ("container:c", "r/x:1", "Always"),
            ("container:d", "r/z", None),
        ]
    )
    assert [(i.image, i.policy) for i in imgs] == [
        ("r/x:1", "Always"),
        ("r/y:1", "IfNotPresent"),
        ("r/z", "Always"),
    ]
    assert imgs[0].containers == ("init:a", "container:c")
    assert (
        default_policy("r/z:latest") == "Always"
        and default_policy("r/z@sha256:" + "a" * 64) == "IfNotPresent"
    )


def test_all_images_of_a_pod_start_at_once_and_policies_are_honoured() -> None:
    async def main() -> None:
        rt = runtime(present={"r/present:1", "r/always:1"}, delay=0.2)
        p, m = puller(rt)
        assert p.submit(
            pod(
                [
                    ("init:i", "r/init:1", "IfNotPresent"),
                    ("container:a", "r/a:1", "IfNotPresent"),
                    ("container:b", "r/b:1", "IfNotPresent"),
                    ("container:n", "r/never:1", "Never"),
                    ("container:p", "r/present:1", "IfNotPresent"),
                    ("container:w", "r/always:1", "Always"),
                ]
            )
        )
        await p.wait_idle()
        pulled = [r.image for r in rt.pulls]
        assert pulled == ["r/init:1", "r/a:1", "r/b:1", "r/always:1"]
        assert rt.max_active == 4  # all at once (concurrency 4)
        (out,) = p.recent
        assert {i.image: i.result for i in out.images} == {
            "r/init:1": "pulled",
            "r/a:1": "pulled",
            "r/b:1": "pulled",
            "r/never:1": "skipped_policy",
            "r/present:1": "present",
            "r/always:1": "pulled",
        }
        assert out.result == "ready"
        assert count(m, "nodeagent_pod_pulls_images_total", result="pulled") == 4
        assert count(m, "nodeagent_pod_pulls_pods_total", result="ready") == 1
        assert count(m, "nodeagent_pod_images_ready_seconds_count") == 1
        # the sandbox config carries the pod's metadata, as the kubelet's would
        sc = rt.pulls[0].sandbox_config
        assert sc is not None
        assert (sc.metadata.name, sc.metadata.namespace, sc.metadata.uid) == ("web", "ns", "u1")
        assert sc.labels["io.kubernetes.pod.uid"] == "u1"

    asyncio.run(main())


def test_concurrency_is_bounded_and_a_pod_is_handled_once() -> None:
    async def main() -> None:
        rt = runtime(delay=0.1)
        p, _ = puller(rt, concurrency=2)
        first = pod([(f"container:c{i}", f"r/i{i}:1", "IfNotPresent") for i in range(5)])
        assert p.submit(first)
        assert not p.submit(first)  # the same UID again (a relist, an update)
        assert not p.submit(pod([("container:c", "r/q:1", None)], uid="u2", phase="Running"))
        await p.wait_idle()
        assert rt.max_active == 2 and len(rt.pulls) == 5

    asyncio.run(main())


def test_pods_needing_the_same_pull_share_it_without_holding_slots() -> None:
    async def main() -> None:
        rt = runtime(delay=0.3)
        p, m = puller(rt, concurrency=1)
        for i in range(20):
            p.submit(pod([("container:c", "r/same:1", "IfNotPresent")], uid=f"u{i}", name=f"p{i}"))
        await p.wait_idle()
        assert len(rt.pulls) == 1
        assert count(m, "nodeagent_pod_pulls_pods_total", result="ready") == 20

    asyncio.run(main())


def test_pull_secrets_first_then_node_credentials_and_secrets_never_reported() -> None:
    async def main() -> None:
        rt = runtime()
        rt.private["reg.local/private:1"] = "ok"
        node = Credentials(docker=DockerConfig({"reg.local": Auth(username="ok", password="node-secret")}))

        async def secrets(namespace: str, names: Any) -> list[dict[str, Auth]]:
            assert (namespace, list(names)) == ("ns", ["wrong", "right"])
            return [
                {"other.local": Auth(username="nope", password="x")},
                {"reg.local": Auth(username="bad", password="pod-secret-1")},
            ]

        p, _ = puller(rt, credentials=node, secrets=secrets)
        p.submit(
            pod([("container:c", "reg.local/private:1", "IfNotPresent")], pull_secrets=("wrong", "right"))
        )
        await p.wait_idle()
        assert [r.auth.username for r in rt.pulls] == ["bad", "ok"]  # the pod's secret, then the node's
        (out,) = p.recent
        assert out.images[0].result == "pulled"
        text = json.dumps(p.status())
        assert "pod-secret-1" not in text and "node-secret" not in text

    asyncio.run(main())


def test_failures_are_reported_with_their_class_and_the_pod_is_partial() -> None:
    async def main() -> None:
        rt = runtime()
        rt.private["r/gone:1"] = "someone else"  # 401 Unauthorized
        p, m = puller(rt)
        p.submit(
            pod([("container:a", "r/gone:1", "IfNotPresent"), ("container:b", "r/ok:1", "IfNotPresent")])
        )
        await p.wait_idle()
        (out,) = p.recent
        gone = out.images[0]
        assert gone.result == "failed" and gone.reason.startswith("unauthorized")  # "401" in the text
        assert out.result == "partial"
        assert count(m, "nodeagent_pod_pulls_images_total", result="failed") == 1

    asyncio.run(main())


def test_disk_check_skips_an_image_with_its_reason() -> None:
    async def main() -> None:
        rt = runtime()

        class Disk:
            tickets: list[int | None] = []

            async def check(self, image: str, auth: Any) -> tuple[str | None, int | None]:
                return ("would fill the image filesystem", None) if "big" in image else (None, 7)

            def done(self, ticket: int | None) -> None:
                self.tickets.append(ticket)

        disk = Disk()
        p, m = puller(rt, disk=disk)
        p.submit(
            pod([("container:a", "r/big:1", "IfNotPresent"), ("container:b", "r/small:1", "IfNotPresent")])
        )
        await p.wait_idle()
        (out,) = p.recent
        assert [(i.result, i.reason) for i in out.images] == [
            ("skipped_disk", "would fill the image filesystem"),
            ("pulled", ""),
        ]
        assert count(m, "nodeagent_pod_pulls_images_total", result="skipped_disk") == 1
        assert disk.tickets == [7]  # the admitted pull's reservation is given back

    asyncio.run(main())


def test_a_pods_images_start_before_the_next_pods_even_when_it_is_slower_to_get_ready() -> None:
    async def main() -> None:
        rt = runtime(delay=0.1)

        async def secrets(namespace: str, names: Any) -> list[dict[str, Auth]]:
            await asyncio.sleep(0.3)  # the first pod's pull secrets take a while to read
            return []

        p, _ = puller(rt, concurrency=2, secrets=secrets)
        p.submit(
            pod([(f"container:a{i}", f"r/a{i}:1", "IfNotPresent") for i in range(3)], pull_secrets=("s",))
        )
        p.submit(pod([(f"container:b{i}", f"r/b{i}:1", "IfNotPresent") for i in range(2)], uid="u2"))
        await p.wait_idle()
        assert [r.image for r in rt.pulls] == ["r/a0:1", "r/a1:1", "r/a2:1", "r/b0:1", "r/b1:1"]
        assert rt.max_active == 2
        assert p.status()["pullSlots"] == {"limit": 2, "busy": 0, "waiting": 0}

    asyncio.run(main())


def test_pod_pulls_and_others_share_one_limit() -> None:
    async def main() -> None:
        from nodeagent.proxy.slots import PullSlots

        rt = runtime(delay=0.2)
        slots = PullSlots(2)
        other = await slots.acquire((slots.ticket(), 0))  # e.g. a prefetch pull through the proxy
        p, _ = puller(rt, slots=slots)
        p.submit(pod([(f"container:c{i}", f"r/c{i}:1", "IfNotPresent") for i in range(3)]))
        await asyncio.sleep(0.1)
        assert [r.image for r in rt.pulls] == ["r/c0:1"]  # one slot left for the pod
        other.release()
        await p.wait_idle()
        assert rt.max_active == 2 and len(rt.pulls) == 3

    asyncio.run(main())
