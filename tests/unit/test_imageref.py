import pytest

from nodeagent.util import imageref as refs


@pytest.mark.parametrize(
    ("ref", "want"),
    [
        ("busybox", "docker.io/library/busybox:latest"),
        ("busybox:1.36", "docker.io/library/busybox:1.36"),
        ("library/busybox", "docker.io/library/busybox:latest"),
        ("bitnami/redis:7", "docker.io/bitnami/redis:7"),
        ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
        ("localhost:5000/app", "localhost:5000/app:latest"),
        ("localhost/app:v1", "localhost/app:v1"),
        (
            "public.ecr.aws/eks-distro/kubernetes/pause:3.10",
            "public.ecr.aws/eks-distro/kubernetes/pause:3.10",
        ),
        ("ghcr.io/x/y@sha256:" + "a" * 64, "ghcr.io/x/y@sha256:" + "a" * 64),
        ("sha256:" + "b" * 64, "sha256:" + "b" * 64),
        ("c" * 64, "sha256:" + "c" * 64),
        # the duplicate check of images.prefetch (nodeagent/config/schema.py) relies on these
        ("nginx", "docker.io/library/nginx:latest"),
        ("index.docker.io/library/nginx:1", "docker.io/library/nginx:1"),
        ("team/app:v1", "docker.io/team/app:v1"),
        ("r.io/app@sha256:" + "a" * 64, "r.io/app@sha256:" + "a" * 64),
    ],
)
def test_normalize(ref: str, want: str) -> None:
    assert refs.normalize(ref) == want


def test_repository_strips_tag_and_digest_not_port() -> None:
    assert refs.repository("localhost:5000/app:v1") == "localhost:5000/app"
    assert refs.repository("ghcr.io/x/y@sha256:" + "a" * 64) == "ghcr.io/x/y"
    assert refs.repository("docker.io/library/busybox:1.36") == "docker.io/library/busybox"


@pytest.mark.parametrize(
    ("pattern", "want"),
    [
        ("busybox*", "docker.io/library/busybox*"),
        ("*", "*"),
        ("*/pause:*", "*/pause:*"),
        ("public.ecr.aws/eks-distro/*", "public.ecr.aws/eks-distro/*"),
        ("bitnami/*", "docker.io/bitnami/*"),
    ],
)
def test_normalize_pattern(pattern: str, want: str) -> None:
    assert refs.normalize_pattern(pattern) == want


def test_every_docker_hub_alias_folds_into_docker_io() -> None:
    for alias in refs.DOCKER_HUB_ALIASES:
        assert refs.normalize(f"{alias}/library/busybox:1") == "docker.io/library/busybox:1"


@pytest.mark.parametrize(
    "alias", ["index.docker.io", "Registry-1.Docker.IO", "REGISTRY.HUB.DOCKER.COM", "docker.io"]
)
def test_one_docker_hub_rule_for_eviction_prefetch_credentials_and_the_proxy(alias: str) -> None:
    # every place that names a registry agrees (they used to disagree on aliases written in capitals)
    from nodeagent.images.credentials import image_for_matching
    from nodeagent.proxy.records import image_label, registry_of

    ref = f"{alias}/library/busybox:1"
    assert refs.normalize(ref) == "docker.io/library/busybox:1"
    assert refs.split_domain(ref) == refs.split_domain("busybox:1") == ("docker.io", "library/busybox:1")
    assert registry_of(ref) == "docker.io"
    assert image_label(ref) == "docker.io/library/busybox:1"
    assert image_for_matching(ref) == "docker.io/library/busybox:1"
