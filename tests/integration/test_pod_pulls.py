"""Pod-aware pulls with real components: etcd + kube-apiserver (Node,RBAC, NodeRestriction), the real
kubelet registered with a node client certificate, containerd running pods, local registries, and
``nodeagent run`` watching the node's pods with the kubelet's own kubeconfig.

One cluster serves the module (a control plane takes a while to start on a loaded machine); each
test uses images of its own. The image filesystem is a small loop filesystem and eviction's high
threshold is low, so the disk test can cross it with modest images (it runs last).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.sandbox import Registry, Sandbox
from tests.sandbox.cluster import Cluster, one_node_cluster
from tests.sandbox.controlplane import docker_config_secret, pod_manifest
from tests.sandbox.net import ThrottleProxy
from tests.sandbox.oci import PushedImage, build_image, push_image
from tests.sandbox.process import wait_until

HIGH = 40  # eviction.highThresholdPercent of the module's nodeagent
RATE = 4 << 20  # bytes/s per connection through the throttle


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Any]]:
    with Sandbox(prefix="na-pp-") as sb:
        reg = sb.registry()
        alice, bob = ("alice", "alice-Secret-4711"), ("bob", "bob-Secret-0815")
        private = Registry(sb.dir / "private", auth=alice)
        private.workdir.mkdir(parents=True)
        for user, pw in (alice, bob):  # two users of one private registry
            flags = "-iBc" if user == "alice" else "-iB"
            subprocess.run(
                ["htpasswd", flags, str(private.htpasswd_path), user],
                input=pw.encode(),
                check=True,
                timeout=30,
            )
        sb.callback(private.stop)
        private.start()
        throttle = sb.throttle_proxy(reg, RATE)
        fs = sb.loopfs(320)
        cluster = one_node_cluster(
            sb,
            reg,
            containerd={"root_dir": fs.mountpoint / "root"},
            agent_config={"eviction": {"highThresholdPercent": HIGH, "lowThresholdPercent": HIGH - 10}},
        )
        for r in (private.host, throttle.address):
            cluster.node.write_hosts_toml(r, f"http://{r}")
        yield {
            "sb": sb,
            "reg": reg,
            "private": private,
            "alice": alice,
            "bob": bob,
            "throttle": throttle,
            "fs": fs,
            "cluster": cluster,
        }


def image(
    env: dict[str, Any], name: str, *, size: int = 1 << 20, registry: Registry | None = None
) -> PushedImage:
    reg = registry or env["reg"]
    return push_image(reg, f"pp/{name}", "v1", build_image(layers=1, layer_size=size, busybox=True))


def via(throttle: ThrottleProxy, img: PushedImage) -> str:
    """The image's reference through the throttling proxy (containerd has a hosts.toml for it)."""
    return img.reference.replace(img.reference.split("/", 1)[0], throttle.address, 1)


def pod_status(c: Cluster, pod: str, timeout: float = 120.0) -> dict[str, Any]:
    """nodeagent's status entry for ``pod`` (namespace default) once it is handled."""
    agent = c.agent
    assert agent is not None
    got: dict[str, Any] = {}

    def handled() -> bool:
        for p in agent.status()["sections"]["podPulls"].get("recent", []):
            if p["pod"] == f"default/{pod}" and p["result"] != "pending":
                got.update(p)
                return True
        return False

    wait_until(f"nodeagent handled pod {pod}", handled, timeout)
    return got


def pulls(c: Cluster, image_ref: str) -> list[dict[str, Any]]:
    assert c.agent is not None
    return [x for x in c.agent.log_lines() if x.get("msg") == "pull" and x.get("image") == image_ref]


def test_pod_with_init_and_two_containers_gets_all_images_at_once(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    throttle = env["throttle"]
    reg: Registry = env["reg"]
    imgs = [image(env, f"three-{n}", size=6 << 20) for n in ("init", "a", "b")]
    refs = [via(throttle, i) for i in imgs]
    mark = reg.mark()
    c.cp.create(
        pod_manifest("three", c.node_name, [("a", refs[1]), ("b", refs[2])], init=[("init", refs[0])])
    )
    c.cp.wait_running("three")
    st = pod_status(c, "three")
    assert {i["image"]: i["result"] for i in st["images"]} == dict.fromkeys(refs, "pulled")
    assert st["result"] == "ready"
    mine = {r: [p for p in pulls(c, r) if p["origin"] == "pod"] for r in refs}
    assert all(len(v) == 1 and v[0]["result"] == "success" for v in mine.values()), mine
    # the three pod pulls overlapped: each started before any of them ended (pull records, status file)
    recs = [r for r in c.agent.status()["pulls"]["recent"] if r["origin"] == "pod" and r["image"] in refs]  # type: ignore[union-attr]
    assert len(recs) == 3
    assert max(r["started_at"] for r in recs) < min(r["started_at"] + r["duration"] for r in recs)
    # one upstream pull per image: whoever came second (the kubelet, or nodeagent when the kubelet
    # asked first) joined the pull in flight, and later the kubelet found the image present
    for r in refs:
        assert sum(not p.get("joined") for p in pulls(c, r)) == 1, json.dumps(pulls(c, r))
    # and the registry served each image's layer once
    for img in imgs:
        layer = img.image.layers[-1].digest
        gets = [
            r for r in reg.requests_since(mark) if r.method == "GET" and r.digest == layer and r.status == 200
        ]
        assert len(gets) == 1, (img.reference, gets)
    text = c.agent.scrape()  # type: ignore[union-attr]
    assert 'nodeagent_pod_pulls_pods_total{result="ready"}' in text
    lead = re.search(r"^nodeagent_pod_pulls_lead_seconds_count (\S+)$", text, re.M)
    assert lead is not None and float(lead.group(1)) >= 1  # images present before the kubelet asked
    assert re.search(
        r'nodeagent_image_pulls_total\{origin="pod",registry="[^"]+",result="success"\} [1-9]', text
    )


def test_pull_policies_are_honoured(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    present = image(env, "policy-present")
    never = image(env, "policy-never")
    always = image(env, "policy-always")
    # make two of them present first, through the pod of another test-only pod
    c.cp.create(pod_manifest("warm", c.node_name, [("p", present.reference), ("n", never.reference)]))
    c.cp.wait_running("warm")
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "policies", "namespace": "default"},
        "spec": {
            "nodeName": c.node_name,
            "hostNetwork": True,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": 0,
            "containers": [
                {
                    "name": n,
                    "image": i.reference,
                    "imagePullPolicy": pol,
                    "command": ["/bin/busybox", "sleep", "3600"],
                }
                for n, i, pol in (
                    ("a", present, "IfNotPresent"),
                    ("b", never, "Never"),
                    ("c", always, "Always"),
                )
            ],
        },
    }
    c.cp.create(pod)
    c.cp.wait_running("policies")
    st = pod_status(c, "policies")
    results = {i["image"]: i["result"] for i in st["images"]}
    assert results == {
        present.reference: "present",
        never.reference: "skipped_policy",
        always.reference: "pulled",
    }


def test_private_image_with_pull_secret_and_the_secret_stays_secret(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    private: Registry = env["private"]
    user, password = env["alice"]
    img = push_image(private, "pp/private", "v1", build_image(layers=1, busybox=True), auth=(user, password))
    c.cp.create(docker_config_secret("alice-creds", private.host, user, password))
    c.cp.create(pod_manifest("private", c.node_name, [("app", img.reference)], pull_secrets=["alice-creds"]))
    c.cp.wait_running("private")
    st = pod_status(c, "private")
    assert st["images"][0]["result"] == "pulled", st
    assert c.agent is not None
    leaks = {
        "log": c.agent.log_path.read_text(),
        "metrics": c.agent.scrape(),
        "status": json.dumps(c.agent.status()),
    }
    for where, text in leaks.items():
        assert password not in text, where


def test_twenty_pods_with_one_image_make_one_upstream_pull(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    throttle = env["throttle"]
    reg: Registry = env["reg"]
    img = image(env, "shared", size=4 << 20)
    ref = via(throttle, img)
    layer = img.image.layers[-1].digest
    mark = reg.mark()
    for i in range(20):
        c.cp.create(pod_manifest(f"same-{i}", c.node_name, [("app", ref)]))
    for i in range(20):
        c.cp.wait_running(f"same-{i}", timeout=240)
    gets = [
        r for r in reg.requests_since(mark) if r.method == "GET" and r.digest == layer and r.status == 200
    ]
    assert len(gets) == 1, gets


def test_different_credentials_never_share_a_pull(env: dict[str, Any]) -> None:
    """Three pods, one private image, three pull secrets: alice and bob (both valid, different users)
    and mallory (alice's user, a wrong password). The registry sits behind a throttle, so that a pull
    takes over a second and the three pod pulls overlap: sharing would be possible, and must not
    happen. Had mallory's pull joined a valid identity's, it would have been handed the image."""
    c: Cluster = env["cluster"]
    private: Registry = env["private"]
    slow = env["sb"].throttle_proxy(private, RATE)
    c.node.write_hosts_toml(slow.address, f"http://{slow.address}")
    pushed = push_image(
        private,
        "pp/two-users",
        "v1",
        build_image(layers=1, layer_size=6 << 20, busybox=True),
        auth=env["alice"],
    )
    ref = via(slow, pushed)
    identities = {"alice": env["alice"], "bob": env["bob"], "mallory": (env["alice"][0], "not-the-password")}
    for who, (u, p) in identities.items():
        c.cp.create(docker_config_secret(f"{who}-two", slow.address, u, p))
    mark = private.mark()
    for who in identities:
        c.cp.create(pod_manifest(f"two-{who}", c.node_name, [("app", ref)], pull_secrets=[f"{who}-two"]))
    for who in ("alice", "bob"):
        c.cp.wait_running(f"two-{who}")
    assert c.agent is not None
    outcome = {who: pod_status(c, f"two-{who}")["images"][0] for who in identities}
    assert outcome["alice"]["result"] == outcome["bob"]["result"] == "pulled", outcome
    # mallory's pull went to the registry with mallory's credentials, and was refused
    assert outcome["mallory"]["result"] == "failed", outcome
    assert outcome["mallory"]["reason"].startswith("unauthorized"), outcome
    mine = [r for r in c.agent.status()["pulls"]["recent"] if r["image"] == ref and r["origin"] == "pod"]
    assert len(mine) == 3, mine
    ok = [r for r in mine if r["result"] == "success"]
    refused = [r for r in mine if r["result"] != "success"]
    assert len(ok) == 2 and len(refused) == 1 and not refused[0].get("joined"), mine
    # the three pulls overlapped: each started while the others were in flight
    assert max(r["started_at"] for r in mine) < min(r["started_at"] + r["duration"] for r in ok), mine
    # one resolve of the tag per valid identity (one shared pull would have made one; the kubelet's
    # own pulls of a pod found the image present or joined its own identity's pull)
    resolved = [
        r
        for r in private.requests_since(mark)
        if r.path == "/v2/pp/two-users/manifests/v1" and r.status == 200
    ]
    assert len(resolved) >= 2, private.requests_since(mark)
    c.cp.delete_pod("two-mallory")


def test_api_server_down_and_back(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    assert c.agent is not None
    before = c.agent.status()["sections"]["podPulls"]
    c.cp.stop_apiserver()
    try:
        wait_until(
            "nodeagent notices the API server is gone",
            lambda: c.agent.status()["sections"]["podPulls"]["apiServerOk"] is False,
            60,
        )
        # the proxy and metrics are unaffected
        status, _ = c.agent.get("/healthz")
        assert status == 200
        from tests.sandbox.containerd import cri_version

        assert cri_version(c.agent.proxy_endpoint)
    finally:
        c.cp.start_apiserver()
    img = image(env, "after-restart")
    c.cp.create(pod_manifest("after-restart", c.node_name, [("app", img.reference)]))
    c.cp.wait_running("after-restart")
    st = pod_status(c, "after-restart")
    assert st["images"][0]["result"] == "pulled"
    after = c.agent.status()["sections"]["podPulls"]
    assert after["apiServerOk"] is True and after["watches"] > before["watches"]


def test_watch_from_a_compacted_version_gets_410_and_lists_again(env: dict[str, Any]) -> None:
    """A real 410 Gone: while the API server is down, etcd's history is compacted past the version
    nodeagent's watch had reached; the API server, back, answers the resumed watch 410 (its watch
    cache starts after that version, and etcd no longer has it either); nodeagent lists again and
    handles a pod created afterwards."""
    c: Cluster = env["cluster"]
    assert c.agent is not None
    wait_until(
        "the watch running",
        lambda: c.agent.status()["sections"]["podPulls"]["apiServerOk"] is True,
        120,
    )
    lists = c.agent.status()["sections"]["podPulls"]["lists"]
    # a write the node's watch does not see (a secret): etcd's revision moves past the watch's version
    c.cp.create(docker_config_secret("moves-the-revision", "example.invalid", "u", "p"))
    c.cp.stop_apiserver()
    try:
        compacted = c.cp.compact_etcd()
    finally:
        c.cp.start_apiserver()
    wait_until(
        "nodeagent lists again",
        lambda: c.agent.status()["sections"]["podPulls"]["lists"] > lists,
        120,
    )
    expired = [x for x in c.agent.log_lines() if x.get("msg") == "pod watch expired; listing again"]
    assert expired and int(expired[-1]["resource_version"]) < compacted, expired
    assert "too old" in expired[-1]["error"], expired  # the API server's words for 410 Gone
    img = image(env, "after-410")
    c.cp.create(pod_manifest("after-410", c.node_name, [("app", img.reference)]))
    c.cp.wait_running("after-410")
    assert pod_status(c, "after-410")["images"][0]["result"] == "pulled"
    assert c.agent.status()["sections"]["podPulls"]["lists"] == lists + 1


def _used_fraction(mount: Path) -> tuple[int, int]:
    import os

    s = os.statvfs(mount)
    total = s.f_blocks * s.f_frsize
    return total - s.f_bavail * s.f_frsize, total


def test_a_pod_that_would_overfill_the_imagefs_is_skipped_with_a_reason(env: dict[str, Any]) -> None:
    c: Cluster = env["cluster"]
    used, total = _used_fraction(env["fs"].mountpoint)
    # An image whose estimated footprint (2x compressed) takes usage 10 points past the high threshold,
    # while the images already there are too recent for eviction to remove: it cannot bring it back.
    need = int((HIGH + 10) / 100 * total) - used
    assert 0 < need < total - used - (20 << 20), (used, total)
    big = image(env, "too-big", size=need // 2)
    small = image(env, "fits")
    c.cp.create(pod_manifest("overfill", c.node_name, [("big", big.reference), ("small", small.reference)]))
    st = pod_status(c, "overfill")
    results = {i["image"]: i for i in st["images"]}
    assert results[big.reference]["result"] == "skipped_disk", st
    assert "eviction can free only" in results[big.reference]["reason"]
    assert results[small.reference]["result"] == "pulled"
    assert 'nodeagent_pod_pulls_images_total{result="skipped_disk"} 1.0' in c.agent.scrape()  # type: ignore[union-attr]
    c.cp.delete_pod("overfill")
