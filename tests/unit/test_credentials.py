"""Credential sources, the kubelet's way. Plugin runs go through an injected runner (unit tests start
no process); the real exec path is in tests/integration/test_prefetch.py with a fake plugin."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from nodeagent.config.model import ImagesConfig
from nodeagent.images.credentials import (
    Auth,
    CredentialError,
    Credentials,
    DockerConfig,
    MirrorCredentialSource,
    ProviderPlugins,
    authorization,
    best_match,
    mirror_target,
    parse_docker_config,
    parse_provider_config,
    urls_match,
)
from nodeagent.util import proc
from nodeagent.util.paths import Paths

API = "credentialprovider.kubelet.k8s.io/v1"


@pytest.mark.parametrize(
    ("pattern", "target", "match"),
    [
        ("*.dkr.ecr.*.amazonaws.com", "111122223333.dkr.ecr.us-west-2.amazonaws.com/app:1", True),
        ("*.dkr.ecr.*.amazonaws.com", "111122223333.dkr.ecr.us-west-2.amazonaws.com.cn/app", False),
        ("*.io", "k8s.gcr.io/pause", False),  # one glob, one label
        ("gcr.io", "gcr.io/project/img:1", True),
        ("app*.k8s.io", "app1.k8s.io/x", True),
        ("registry.io:8080/path", "registry.io:8080/path/img", True),
        ("registry.io:8080/path", "registry.io:8080/other/img", False),
        ("registry.io", "registry.io:8080/img", False),  # ports must be equal
        ("registry.io:8080", "registry.io/img", False),
        ("https://gcr.io", "gcr.io/x", True),
    ],
)
def test_urls_match_follows_the_kubelet(pattern: str, target: str, match: bool) -> None:
    assert urls_match(pattern, target) is match


def test_best_match_prefers_the_most_specific_key() -> None:
    keys = ["*.example.com", "reg.example.com", "reg.example.com/team"]
    assert best_match(keys, "reg.example.com/team/app:1") == "reg.example.com/team"
    assert best_match(keys, "reg.example.com/other:1") == "reg.example.com"
    assert best_match(keys, "x.example.com/a") == "*.example.com"
    assert best_match(keys, "example.com/a") is None


def provider_config(**over: Any) -> str:
    p = {
        "name": "ecr-credential-provider",
        "matchImages": ["*.dkr.ecr.*.amazonaws.com"],
        "defaultCacheDuration": "12h",
        "apiVersion": API,
        "args": ["get-credentials"],
        "env": [{"name": "AWS_REGION", "value": "us-west-2"}],
    }
    p.update(over)
    return json.dumps(
        {"apiVersion": "kubelet.config.k8s.io/v1", "kind": "CredentialProviderConfig", "providers": [p]}
    )


def test_provider_config_parses() -> None:
    (p,) = parse_provider_config(provider_config(), "/etc/cfg.json")
    assert (p.name, p.default_cache_duration, p.args, p.env) == (
        "ecr-credential-provider",
        43200.0,
        ("get-credentials",),
        (("AWS_REGION", "us-west-2"),),
    )


@pytest.mark.parametrize(
    ("over", "message"),
    [
        (
            {"name": "../../bin/sh"},
            "/etc/cfg.json: providers[0].name: '../../bin/sh' is not a plain file name",
        ),
        ({"matchImages": []}, "/etc/cfg.json: providers[0].matchImages: must be a non-empty list of strings"),
        (
            {"defaultCacheDuration": "soon"},
            "/etc/cfg.json: providers[0].defaultCacheDuration: required duration",
        ),
        ({"apiVersion": "v9"}, "/etc/cfg.json: providers[0].apiVersion: unsupported 'v9'"),
    ],
)
def test_provider_config_errors_name_the_file_and_key(over: dict[str, Any], message: str) -> None:
    with pytest.raises(CredentialError) as e:
        parse_provider_config(provider_config(**over), "/etc/cfg.json")
    assert str(e.value).startswith(message)


class Runner:
    """Stands in for nodeagent.util.proc.run: records the call, answers like a provider plugin."""

    def __init__(self, response: dict[str, Any], returncode: int = 0) -> None:
        self.response = response
        self.returncode = returncode
        self.calls: list[dict[str, Any]] = []

    def __call__(self, argv: list[str], **kw: Any) -> proc.Result:
        self.calls.append({"argv": argv, **kw})
        return proc.Result(self.returncode, json.dumps(self.response).encode(), b"token=leaked-secret")


def response(
    key_type: str = "Registry", duration: str | None = "1h", key: str = "*.dkr.ecr.*.amazonaws.com"
) -> dict[str, Any]:
    r: dict[str, Any] = {
        "apiVersion": API,
        "kind": "CredentialProviderResponse",
        "cacheKeyType": key_type,
        "auth": {key: {"username": "AWS", "password": "ecr-token-secret"}},
    }
    if duration is not None:
        r["cacheDuration"] = duration
    return r


ECR1 = "111122223333.dkr.ecr.us-west-2.amazonaws.com/app:1"
ECR2 = "111122223333.dkr.ecr.us-west-2.amazonaws.com/other:2"


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def plugins(runner: Runner, clock: Clock | None = None) -> ProviderPlugins:
    return ProviderPlugins(
        parse_provider_config(provider_config(), "cfg"),
        Path("/etc/eks/image-credential-provider"),
        run=runner,
        clock=clock or Clock(),
        base_env={"PATH": "/usr/bin"},
    )


def test_plugin_is_executed_with_the_request_args_and_env() -> None:
    runner = Runner(response())
    auth = plugins(runner).lookup(ECR1)
    assert auth is not None and (auth.username, auth.password) == ("AWS", "ecr-token-secret")
    (call,) = runner.calls
    assert call["argv"] == ["/etc/eks/image-credential-provider/ecr-credential-provider", "get-credentials"]
    assert json.loads(call["stdin"]) == {
        "apiVersion": API,
        "kind": "CredentialProviderRequest",
        "image": ECR1,
    }
    assert call["env"] == {"PATH": "/usr/bin", "AWS_REGION": "us-west-2"}


def test_registry_cache_is_honoured_until_it_expires() -> None:
    clock = Clock()
    runner = Runner(response("Registry", "1h"))
    pl = plugins(runner, clock)
    pl.lookup(ECR1)
    pl.lookup(ECR2)  # same registry: cached
    assert len(runner.calls) == 1
    clock.now += 3601
    pl.lookup(ECR2)
    assert len(runner.calls) == 2


def test_image_cache_key_and_default_duration() -> None:
    runner = Runner(response("Image", None))  # no cacheDuration: the provider's default (12h)
    pl = plugins(runner)
    pl.lookup(ECR1)
    pl.lookup(ECR1)
    pl.lookup(ECR2)  # another image: not covered by an Image key
    assert len(runner.calls) == 2


def test_zero_duration_is_not_cached_and_forget_drops_entries() -> None:
    runner = Runner(response("Global", "0s"))
    pl = plugins(runner)
    pl.lookup(ECR1)
    pl.lookup(ECR1)
    assert len(runner.calls) == 2
    runner.response = response("Global", "1h")
    pl.lookup(ECR1)
    pl.forget(ECR1)
    pl.lookup(ECR1)
    assert len(runner.calls) == 4


def test_images_the_provider_does_not_match_never_run_it() -> None:
    runner = Runner(response())
    assert plugins(runner).lookup("docker.io/library/busybox:1") is None
    assert runner.calls == []


def test_failing_plugin_error_carries_no_secret() -> None:
    runner = Runner(response(), returncode=1)
    with pytest.raises(CredentialError) as e:
        plugins(runner).lookup(ECR1)
    assert str(e.value) == "credential provider ecr-credential-provider: exit 1"
    runner = Runner({"kind": "CredentialProviderResponse", "apiVersion": "x", "auth": {}})
    with pytest.raises(CredentialError) as e:
        plugins(runner).lookup(ECR1)
    assert "apiVersion" in str(e.value) and "secret" not in str(e.value)


def test_auth_repr_hides_secrets() -> None:
    a = Auth(username="AWS", password="ecr-token-secret", source="provider x")
    assert "ecr-token-secret" not in repr(a) and "AWS" not in repr(a)
    assert a.cri_fields() == {"username": "AWS", "password": "ecr-token-secret"}


def test_docker_config_auths() -> None:
    text = json.dumps(
        {
            "auths": {
                "https://index.docker.io/v1/": {"auth": base64.b64encode(b"hubuser:hubpass").decode()},
                "reg.example.com:5000": {"username": "u", "password": "p"},
            }
        }
    )
    dc = DockerConfig(parse_docker_config(text, "config.json"))
    hub = dc.lookup("busybox:1.36")
    assert hub is not None and (hub.username, hub.password) == ("hubuser", "hubpass")
    assert dc.lookup("reg.example.com:5000/a/b:1") is not None
    assert dc.lookup("reg.example.com/a/b:1") is None


def test_docker_config_bad_auth_is_reported_without_the_value() -> None:
    text = json.dumps({"auths": {"r.io": {"auth": "bm90LWEtcGFpcg=="}}})  # "not-a-pair"
    with pytest.raises(CredentialError) as e:
        parse_docker_config(text, "/var/lib/kubelet/config.json")
    assert str(e.value) == "/var/lib/kubelet/config.json: auths: entry 0: auth is not user:password"


def test_from_config_reads_files_under_root_and_tolerates_missing_ones(tmp_path: Path) -> None:
    paths = Paths(tmp_path)
    creds = Credentials.from_config(paths, ImagesConfig())
    assert creds.lookup(ECR1) is None
    cfg = paths.host("/etc/eks/image-credential-provider/config.json")
    cfg.parent.mkdir(parents=True)
    cfg.write_text(provider_config())
    runner = Runner(response())
    creds = Credentials.from_config(paths, ImagesConfig(), run=runner)
    assert creds.lookup(ECR1) is not None
    assert runner.calls[0]["argv"][0] == str(
        tmp_path / "etc/eks/image-credential-provider/ecr-credential-provider"
    )


# --- mirror credentials (containerd.mirrors.<registry>[i].credentials) ------------------------------
ECR_MIRROR = "https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub"


@pytest.mark.parametrize(
    ("endpoint", "target"),
    [
        (ECR_MIRROR, "111122223333.dkr.ecr.us-west-2.amazonaws.com/docker-hub"),
        ("http://127.0.0.1:5000", "127.0.0.1:5000"),
        ("https://Mirror.Example/v2", "mirror.example"),
        ("https://mirror.example/cache/hub/", "mirror.example/cache/hub"),
    ],
)
def test_mirror_target_is_host_and_path_without_the_api_root(endpoint: str, target: str) -> None:
    assert mirror_target(endpoint) == target


def test_authorization_values() -> None:
    assert (
        authorization(Auth(username="AWS", password="tok"))
        == "Basic " + base64.b64encode(b"AWS:tok").decode()
    )
    assert authorization(Auth(auth="YTpi")) == "Basic YTpi"
    assert authorization(Auth(registry_token="rt")) == "Bearer rt"
    with pytest.raises(CredentialError, match="identity token"):
        authorization(Auth(identity_token="idt", source="docker config x"))


def test_provider_source_gets_a_fresh_answer_each_time_with_its_lifetime() -> None:
    runner = Runner(response(duration="6h"))
    clock = Clock()
    p = plugins(runner, clock)
    src = MirrorCredentialSource(ECR_MIRROR, "provider", plugins=lambda: p, clock=clock)
    a = src.fetch()
    assert a.header == "Basic " + base64.b64encode(b"AWS:ecr-token-secret").decode()
    assert (a.lifetime, a.refresh_at(), a.expires()) == (6 * 3600, 100 + 3 * 3600, 100 + 6 * 3600)
    assert "ecr-token-secret" not in repr(a) and a.header not in repr(a)
    assert (
        json.loads(runner.calls[0]["stdin"])["image"]
        == "111122223333.dkr.ecr.us-west-2.amazonaws.com/docker-hub"
    )
    assert not src.refresh_due(a, 100 + 3 * 3600 - 1) and src.refresh_due(a, 100 + 3 * 3600)
    src.fetch()
    assert len(runner.calls) == 2  # never the prefetch cache: a mirror refresh must get a new token


def test_provider_source_errors_name_no_secret() -> None:
    p = plugins(Runner(response(), returncode=1))
    src = MirrorCredentialSource(ECR_MIRROR, "provider", plugins=lambda: p)
    with pytest.raises(CredentialError) as e:
        src.fetch()
    assert str(e.value) == "credential provider ecr-credential-provider: exit 1" and "leaked" not in str(
        e.value
    )
    nomatch = MirrorCredentialSource("http://127.0.0.1:5000", "provider", plugins=lambda: p)
    with pytest.raises(CredentialError, match=r"no credential provider matches 127\.0\.0\.1:5000"):
        nomatch.fetch()


def test_file_source_is_reread_when_the_file_changes(tmp_path: Path) -> None:
    f = tmp_path / "login"
    f.write_text("robot:first-secret\n")
    src = MirrorCredentialSource("http://m:5000", "file", path=f)
    a = src.fetch()
    assert a.header == "Basic " + base64.b64encode(b"robot:first-secret").decode() and a.lifetime is None
    assert not src.refresh_due(a, 1e12)
    f.write_text("robot:second-secret-longer\n")
    assert src.refresh_due(a, 0)
    f.write_text("no colon here")
    with pytest.raises(CredentialError) as e:
        src.fetch()
    assert "expected one line username:password" in str(e.value) and "colon" not in str(e.value)


def test_docker_config_source_matches_the_mirror_host(tmp_path: Path) -> None:
    f = tmp_path / "config.json"
    enc = base64.b64encode(b"u:docker-secret").decode()
    f.write_text(json.dumps({"auths": {"https://m:5000": {"auth": enc}, "other.example": {"auth": "eDp5"}}}))
    src = MirrorCredentialSource("http://m:5000/v2", "dockerConfig", path=f)
    assert src.fetch().header == f"Basic {enc}"
    missing = MirrorCredentialSource("http://nowhere:1", "dockerConfig", path=f)
    with pytest.raises(CredentialError, match="no auths entry matches nowhere:1"):
        missing.fetch()


def test_provider_source_without_any_plugin_says_so() -> None:
    empty = ProviderPlugins((), Path("/etc/eks/image-credential-provider"), run=Runner(response()))
    src = MirrorCredentialSource(ECR_MIRROR, "provider", plugins=lambda: empty)
    with pytest.raises(CredentialError, match="no credential provider plugins"):
        src.fetch()
