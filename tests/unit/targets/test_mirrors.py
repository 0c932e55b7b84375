import tomllib
from pathlib import Path

import pytest

from nodeagent.apply.targets import TargetError, is_owned, mirrors
from nodeagent.config.model import Mirror
from nodeagent.config.warnings import config_warnings
from nodeagent.util.paths import Paths
from tests.unit.targets.helpers import config, facts


def test_hosts_toml_has_server_and_ordered_mirrors_with_every_option() -> None:
    text = mirrors.render_hosts_toml(
        "docker.io",
        (
            Mirror("https://ecr.example/v2/docker-hub", override_path=True),
            Mirror(
                "http://127.0.0.1:4001",
                capabilities=("pull",),
                skip_verify=True,
                ca=("/etc/ca.pem",),
                dial_timeout=0.5,
                header=(("X-Token", ("a", "b")),),
            ),
        ),
    )
    assert is_owned(text)
    doc = tomllib.loads(text)
    assert doc["server"] == "https://registry-1.docker.io"
    assert list(doc["host"]) == ["https://ecr.example/v2/docker-hub", "http://127.0.0.1:4001"]
    first, second = doc["host"].values()
    assert first == {"capabilities": ["pull", "resolve"], "override_path": True}
    assert second == {
        "capabilities": ["pull"],
        "skip_verify": True,
        "ca": "/etc/ca.pem",
        "dial_timeout": "500ms",
        "header": {"X-Token": ["a", "b"]},
    }


def test_render_is_deterministic() -> None:
    m = (Mirror("http://mirror:5000"),)
    assert mirrors.render_hosts_toml("quay.io", m) == mirrors.render_hosts_toml("quay.io", m)


@pytest.mark.parametrize(
    ("registry", "server"),
    [
        ("docker.io", "https://registry-1.docker.io"),
        ("quay.io", "https://quay.io"),
        ("registry.example:5000", "https://registry.example:5000"),
        ("_default", None),
        ("127.0.0.1:5000", None),  # containerd's own default: plain HTTP for loopback
        ("localhost:5000", None),
    ],
)
def test_server_for(registry: str, server: str | None) -> None:
    assert mirrors.server_for(registry) == server
    doc = tomllib.loads(mirrors.render_hosts_toml(registry, ()))
    assert doc.get("server") == server


def test_several_cas_become_a_list() -> None:
    doc = tomllib.loads(mirrors.render_hosts_toml("q.io", (Mirror("https://m", ca=("/a", "/b")),)))
    assert doc["host"]["https://m"]["ca"] == ["/a", "/b"]


@pytest.mark.parametrize(
    "name", ["..", "../etc", "a/b", "", ".", "a\x00b", "-bad", "has space", "a..b", "x" * 300, "/abs"]
)
def test_registry_names_that_could_escape_are_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(TargetError):
        mirrors.hosts_toml_path(Paths(tmp_path), "/etc/containerd/certs.d", name)
    with pytest.raises(TargetError):
        mirrors.render_hosts_toml(name, ())


def test_hosts_toml_path_stays_in_hosts_dir(tmp_path: Path) -> None:
    p = mirrors.hosts_toml_path(Paths(tmp_path), "/etc/containerd/certs.d", "_default")
    assert p == tmp_path / "etc/containerd/certs.d/_default/hosts.toml"


def test_bad_endpoint_refused() -> None:
    with pytest.raises(TargetError, match=r"containerd.mirrors.q.io\[0\].endpoint"):
        mirrors.render_hosts_toml("q.io", (Mirror("ftp://x"),))
    with pytest.raises(TargetError):
        mirrors.render_hosts_toml("q.io", (Mirror('https://x"]\n[evil'),))


def test_render_plans_files_and_removes_only_stale_owned_ones(tmp_path: Path) -> None:
    cfg = config(
        """
        containerd:
          mirrors:
            docker.io:
              - endpoint: http://127.0.0.1:4001
                header: {Authorization: "Bearer t0ken"}
            quay.io:
              - endpoint: http://127.0.0.1:4002
        """
    )
    stale = tmp_path / "etc/containerd/certs.d/old.io/hosts.toml"
    kept = tmp_path / "etc/containerd/certs.d/quay.io/hosts.toml"
    plan = mirrors.render(cfg, facts(tmp_path, owned_hosts_files=(stale, kept)))
    assert [f.path for f in plan.files] == [
        tmp_path / "etc/containerd/certs.d/docker.io/hosts.toml",
        kept,
    ]
    docker = plan.files[0]
    assert docker.secret and docker.mode == 0o600  # header values may be tokens
    assert not plan.files[1].secret and plan.files[1].mode == 0o644
    assert plan.remove == [stale]


def test_spegel_mirrors_detected() -> None:
    cfg = config(
        """
        containerd:
          mirrors:
            docker.io:
              - endpoint: http://127.0.0.1:30020
            quay.io:
              - endpoint: http://cache.example:5000
        """
    )
    assert mirrors.spegel_mirrors(cfg) == ["http://127.0.0.1:30020"]


def test_registry_name_with_a_trailing_newline_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TargetError):
        mirrors.hosts_toml_path(Paths(tmp_path), "/etc/containerd/certs.d", "docker.io\n")


# --- mirror-only registries and credentials (issue 15) ----------------------------------------------
def test_mirror_only_has_no_upstream_the_last_mirror_is_also_the_server() -> None:
    a = Mirror("http://a:5000")
    b = Mirror(
        "https://ecr.example/v2/docker-hub",
        override_path=True,
        header=(("Authorization", ("Basic Zm9vOmJhcg==",)),),
    )
    text = mirrors.render_hosts_toml("docker.io", (a, b), mirror_only=True)
    doc = tomllib.loads(text)
    assert "registry-1.docker.io" not in text and "(mirror-only)" in text.splitlines()[0]
    # the server carries the last mirror's settings at the top level (what containerd reads for it)
    assert doc["server"] == b.endpoint
    assert doc["capabilities"] == ["pull", "resolve"] and doc["override_path"] is True
    assert doc["header"] == {"Authorization": ["Basic Zm9vOmJhcg=="]}
    # every mirror is still a [host] (containerd 1.6 ignores a file without one), in order
    assert list(doc["host"]) == [a.endpoint, b.endpoint]


def test_mirror_only_single_mirror_and_empty_list() -> None:
    doc = tomllib.loads(mirrors.render_hosts_toml("quay.io", (Mirror("http://m:1"),), mirror_only=True))
    assert doc["server"] == "http://m:1" and list(doc["host"]) == ["http://m:1"]
    with pytest.raises(TargetError, match="mirror-only registry without a mirror"):
        mirrors.render_hosts_toml("quay.io", (), mirror_only=True)


def test_a_file_with_mirror_credentials_is_secret_and_0600(tmp_path: Path) -> None:
    cfg = config(
        """
        containerd:
          mirrors:
            quay.io:
              - endpoint: http://m:5000
                credentials: {from: provider}
            ghcr.io:
              - endpoint: http://x:1
        """
    )
    plan = mirrors.render(cfg, facts(tmp_path))
    by_registry = {f.path.parent.name: f for f in plan.files}
    assert by_registry["quay.io"].mode == 0o600 and by_registry["quay.io"].secret
    assert by_registry["ghcr.io"].mode == 0o644 and not by_registry["ghcr.io"].secret


def test_long_form_mirror_only_is_rendered_and_the_short_form_is_unchanged(tmp_path: Path) -> None:
    cfg = config(
        """
        containerd:
          mirrors:
            docker.io:
              mirrorOnly: true
              mirrors:
                - endpoint: http://m:5000
            quay.io:
              - endpoint: http://q:5000
        """
    )
    assert cfg.containerd.mirror_only == frozenset({"docker.io"})
    files = {f.path.parent.name: tomllib.loads(f.content) for f in mirrors.render(cfg, facts(tmp_path)).files}
    assert files["docker.io"]["server"] == "http://m:5000"
    assert files["quay.io"]["server"] == "https://quay.io"


def test_warnings_explain_mirror_only_and_unrefreshed_credentials() -> None:
    cfg = config(
        """
        containerd:
          mirrorHealth: {enabled: false}
          mirrors:
            docker.io:
              mirrorOnly: true
              mirrors:
                - endpoint: http://m:5000
                  credentials: {from: file, path: /etc/nodeagent/login}
        """
    )
    (only, stale) = config_warnings(cfg)
    assert only.startswith("containerd.mirrors.docker.io.mirrorOnly: pulls from docker.io never go to")
    assert "while its mirror is down every pull from docker.io fails" in only and "second mirror" in only
    assert "never refreshed" in stale
