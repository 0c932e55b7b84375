"""Registry normalization, image labels and failure classification (pure functions)."""

from __future__ import annotations

import pytest

from nodeagent.proxy.records import PullRecord, classify, image_label, registry_of
from nodeagent.run.metrics import RESULTS

ID = "sha256:" + "d" * 64


@pytest.mark.parametrize(
    ("ref", "registry"),
    [
        ("busybox", "docker.io"),
        ("busybox:1.36", "docker.io"),
        ("library/busybox", "docker.io"),
        ("bitnami/redis:7", "docker.io"),
        ("docker.io/library/busybox:1", "docker.io"),
        ("index.docker.io/library/busybox:1", "docker.io"),
        ("registry-1.docker.io/x/y", "docker.io"),
        ("Index.Docker.IO/x/y", "docker.io"),
        ("public.ecr.aws/eks/pause:3.9", "public.ecr.aws"),
        (
            "123456789012.dkr.ecr.us-west-2.amazonaws.com/app:v1",
            "123456789012.dkr.ecr.us-west-2.amazonaws.com",
        ),
        ("localhost/app", "localhost"),
        ("localhost:5000/app:1", "localhost:5000"),
        ("127.0.0.1:5000/a/b@sha256:" + "e" * 64, "127.0.0.1:5000"),
        ("REG.Example.COM/App:1", "reg.example.com"),
        (ID, ""),
        ("d" * 64, ""),
        ("", ""),
    ],
)
def test_registry_of(ref: str, registry: str) -> None:
    assert registry_of(ref) == registry


@pytest.mark.parametrize(
    ("ref", "label"),
    [
        ("busybox", "docker.io/library/busybox"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("reg.local:5000/a/b:1", "reg.local:5000/a/b:1"),
        ("reg.local/a@sha256:" + "e" * 64, "reg.local/a"),
        ("reg.local/a:1@sha256:" + "e" * 64, "reg.local/a:1"),
        (ID, "(image id)"),
    ],
)
def test_image_label_never_carries_a_digest(ref: str, label: str) -> None:
    assert image_label(ref) == label
    assert "sha256" not in image_label(ref)


@pytest.mark.parametrize(
    ("code", "message", "result"),
    [
        ("DEADLINE_EXCEEDED", "context deadline exceeded", "canceled"),
        ("CANCELLED", "401 Unauthorized", "canceled"),
        (
            "UNKNOWN",
            'failed to pull and unpack image "docker.io/library/x:1": failed to copy: httpReadSeeker: '
            "failed open: unexpected status code "
            "https://registry-1.docker.io/v2/library/x/manifests/sha256:ab: "
            "429 Too Many Requests - Server message: toomanyrequests: You have reached your pull rate limit",
            "rate_limited",
        ),
        (
            "UNKNOWN",
            'failed to resolve reference "127.0.0.1:5000/p:1": pulling from host 127.0.0.1:5000 failed with '
            "status code [manifests 1]: 401 Unauthorized",
            "unauthorized",
        ),
        (
            "UNKNOWN",
            "unexpected status from HEAD request to https://x/v2/y/manifests/1: 403 Forbidden",
            "unauthorized",
        ),
        (
            "UNKNOWN",
            "pull access denied, repository does not exist or may require authorization",
            "unauthorized",
        ),
        (
            "UNKNOWN",
            'failed to resolve reference "r/x:1": illegal base64 data at input byte 4',
            "unauthorized",
        ),
        ("NOT_FOUND", 'failed to resolve reference "r/x:1": r/x:1: not found', "not_found"),
        ("UNKNOWN", "manifest unknown: manifest unknown", "not_found"),
        ("UNKNOWN", "no match for platform in manifest: not found", "not_found"),
        (
            "UNKNOWN",
            "failed to extract layer sha256:ab: write /var/lib/containerd/x: "
            "no space left on device: unknown",
            "no_space",
        ),
        ("RESOURCE_EXHAUSTED", "disk full", "no_space"),
        ("UNKNOWN", "dial tcp 10.0.0.1:443: connect: connection refused", "network"),
        ("UNKNOWN", "dial tcp: lookup reg.example: no such host", "network"),
        ("UNKNOWN", "read tcp 1.2.3.4:5->6.7.8.9:443: read: connection reset by peer", "network"),
        ("UNKNOWN", "net/http: TLS handshake timeout", "network"),
        ("UNKNOWN", "unexpected status code: 503 Service Unavailable", "network"),
        ("UNAVAILABLE", "connection error", "network"),
        ("UNKNOWN", "failed commit on ref: unexpected commit digest sha256:401abc", "other"),
        ("INTERNAL", "something odd", "other"),
    ],
)
def test_classify(code: str, message: str, result: str) -> None:
    assert classify(code, message) == result
    assert result in RESULTS


def test_record_json_and_throughput() -> None:
    r = PullRecord(
        image="a:1", registry="docker.io", result="success", duration=2.0, started_at=1.0, bytes=100
    )
    assert r.ok and r.throughput == 50.0
    d = r.to_json()
    assert d["throughput"] == 50.0 and "extra" not in d
    assert PullRecord("a", "r", "other", 0.0, 0.0).throughput == 0.0
