"""String formats of the config schema: what is accepted and what is refused, with the reason."""

from __future__ import annotations

import re

import pytest

from nodeagent.config import formats as f


@pytest.mark.parametrize(
    "name",
    [
        "_default",
        "docker.io",
        "registry.k8s.io",
        "localhost",
        "localhost:5000",
        "10.0.0.1:5000",
        "[fd00::1]:5000",
        "111122223333.dkr.ecr.us-west-2.amazonaws.com",
        "Docker.IO",
    ],
)
def test_registry_hosts_accepted(name: str) -> None:
    assert f.check_registry_host(name) is None
    assert re.fullmatch(f.REGISTRY_HOST.pattern or "", name)


@pytest.mark.parametrize(
    "name",
    [
        "",
        "..",
        ".",
        ".hidden",
        "a/b",
        "../etc",
        "a\\b",
        "x\x00y",
        "docker..io",
        "_default/x",
        "-bad.io",
        "bad-.io",
        "a_b.io",
        "host:port",
        "host:0",
        "host:65536",
        "[::1",
        "[zz::1]:5000",
        "999.1.1.1",
        "docker.io\n",
        "a" * 64 + ".io",
        "docker.io:5000:1",
    ],
)
def test_registry_hosts_refused(name: str) -> None:
    assert f.check_registry_host(name) is not None
    # the JSON Schema pattern cannot check port ranges or address validity; the loader does
    looser = {"999.1.1.1", "[zz::1]:5000", "host:0", "host:65536"}
    assert not re.fullmatch(f.REGISTRY_HOST.pattern or "", name) or name in looser


@pytest.mark.parametrize(
    "ref",
    [
        "nginx",
        "nginx:1.25",
        "library/nginx:latest",
        "docker.io/library/nginx:1.25-alpine",
        "public.ecr.aws/eks-distro/kubernetes/pause:3.10",
        "localhost:5000/team/app:v1",
        "[fd00::1]:5000/app:v1",
        "registry.k8s.io/pause@sha256:" + "a" * 64,
        "registry.k8s.io/pause:3.9@sha256:" + "a" * 64,
        "Registry.Example.com/app:TAG_1.0",
        "a__b/c--d/e.f_g:tag",
    ],
)
def test_image_references_accepted(ref: str) -> None:
    assert f.check_image_reference(ref) is None
    assert re.fullmatch(f.IMAGE_REFERENCE_PATTERN, ref)


@pytest.mark.parametrize(
    ("ref", "reason"),
    [
        ("", "image reference must not be empty"),
        ("Nginx", "invalid image reference: repository name must be lowercase"),
        ("nginx:", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("nginx:-tag", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("nginx:" + "a" * 129, "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("nginx@sha256:abc", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("a_-b", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("/nginx", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("nginx ", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("nginx\n", "invalid image reference (expected [registry/]repository[:tag][@digest])"),
        ("r.io/" + "a" * 252, "invalid image reference: name is longer than 255 characters"),
    ],
)
def test_image_references_refused(ref: str, reason: str) -> None:
    assert f.check_image_reference(ref) == reason


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://m.example.com", None),
        ("http://127.0.0.1:4001", None),
        ("https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub", None),
        ("http://[fd00::1]:5000/", None),
        ("ftp://m.example.com", "must be an http:// or https:// URL"),
        ("m.example.com", "must be an http:// or https:// URL"),
        ("https://", "URL has no host"),
        (
            "https://u:p@m.example.com",
            "must not contain credentials (user:password@); use header or a credential provider",
        ),
        ("https://m.example.com:0", "URL port must be between 1 and 65535"),
        ("https://m.example.com:http", "URL port must be a number"),
        ("https://m_x.example.com", "URL has an invalid host name"),
        ("https://m.example.com/?a=1", "URL must not have a query or fragment"),
        ("https://m.example.com/#x", "URL must not have a query or fragment"),
        ("https://m.example.com/a b", "must be a URL without spaces or control characters"),
    ],
)
def test_mirror_urls(url: str, reason: str | None) -> None:
    assert f.check_http_url(url) == reason


@pytest.mark.parametrize(
    ("addr", "reason"),
    [
        ("0.0.0.0:9847", None),
        ("127.0.0.1:0", None),
        (":9847", None),
        ("[::]:9847", None),
        ("localhost:9847", None),
        ("9847", "must be host:port (for example 0.0.0.0:9847, 127.0.0.1:9847 or [::]:9847)"),
        ("::9847", "must be host:port (for example 0.0.0.0:9847, 127.0.0.1:9847 or [::]:9847)"),
        ("0.0.0.0:70000", "port must be between 0 and 65535"),
        ("300.0.0.1:80", "invalid IPv4 address"),
    ],
)
def test_listen_addresses(addr: str, reason: str | None) -> None:
    assert f.check_listen(addr) == reason


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("unix:///run/containerd/containerd.sock", None),
        ("unix://run/containerd.sock", "must be an absolute path"),
        ("unix://", "must be a unix socket endpoint: unix:///absolute/path"),
        ("/run/containerd.sock", "must be a unix socket endpoint: unix:///absolute/path"),
        ("unix:///run/../etc/x.sock", "path must not contain '..'"),
        ("unix:///" + "a" * 107, "socket path is longer than 107 bytes (the unix socket limit)"),
    ],
)
def test_unix_endpoints(endpoint: str, reason: str | None) -> None:
    assert f.check_unix_endpoint(endpoint) == reason


@pytest.mark.parametrize(
    ("pattern", "reason"),
    [
        ("public.ecr.aws/eks-distro/*", None),
        ("registry.k8s.io/pause:3.[0-9]*", None),
        ("*", None),
        ("", "pattern must not be empty"),
        ("a b", "invalid pattern: character ' ' cannot appear in an image reference or glob"),
        ("a[bc", "invalid pattern: unclosed '['"),
    ],
)
def test_protect_globs(pattern: str, reason: str | None) -> None:
    assert f.check_glob(pattern) == reason


def test_header_names_and_values() -> None:
    assert f.check_header_name("X-Auth-Token") is None
    assert f.check_header_name("Bad:Name") is not None
    assert f.check_header_name("") is not None
    assert f.check_header_value("Bearer abc.def") is None
    for bad in ("a\r\nb", "a\nb", "\x00", "caf\u00e9", "x" * 8193):
        message = f.check_header_value(bad)
        assert message is not None and message.endswith("(value not shown)")
