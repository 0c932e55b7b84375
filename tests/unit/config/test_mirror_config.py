"""``containerd.mirrors``: the long form (mirrorOnly) and per-mirror credentials (issue 15)."""

from __future__ import annotations

import textwrap

import jsonschema
import pytest
import yaml

from nodeagent.config import ConfigError, load_text
from nodeagent.config.model import MirrorCredentials
from nodeagent.config.schema import json_schema

HEADER = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"


def load(body: str):  # type: ignore[no-untyped-def]
    return load_text(HEADER + textwrap.dedent(body), "<test>")


def problems(body: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load(body)
    return [str(p) for p in e.value.problems]


def test_short_and_long_forms_and_credentials() -> None:
    c = load(
        """
        containerd:
          mirrors:
            docker.io:
              mirrorOnly: true
              mirrors:
                - endpoint: https://1111.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub
                  overridePath: true
                  credentials: {from: provider}
            quay.io:
              - endpoint: http://q:5000
                credentials: {from: dockerConfig, image: q:5000/team}
              - endpoint: http://r:5000
                credentials: {from: file, path: /etc/nodeagent/r-login}
        """
    )
    (docker, quay) = c.containerd.mirrors
    assert docker[0] == "docker.io" and docker[1][0].credentials == MirrorCredentials("provider")
    assert quay[1][0].credentials == MirrorCredentials("dockerConfig", image="q:5000/team")
    assert quay[1][1].credentials == MirrorCredentials("file", path="/etc/nodeagent/r-login")
    assert c.containerd.mirror_only == frozenset({"docker.io"})
    assert c.containerd.is_mirror_only("docker.io") and not c.containerd.is_mirror_only("quay.io")


def test_long_form_without_mirror_only_equals_the_short_form() -> None:
    long = load("containerd: {mirrors: {docker.io: {mirrors: [{endpoint: 'http://m:1'}]}}}")
    short = load("containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1'}]}}")
    assert long == short


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1', credentials: {from: file}}]}}",
            'containerd.mirrors["docker.io"][0].credentials.path: required with from: file',
        ),
        (
            "containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1', credentials: {from: provider, "
            "path: /x}}]}}",
            'containerd.mirrors["docker.io"][0].credentials.path: not used with from: provider',
        ),
        (
            "containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1', credentials: {from: vault}}]}}",
            'containerd.mirrors["docker.io"][0].credentials.from: ',
        ),
        (
            "containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1', credentials: {}}]}}",
            'containerd.mirrors["docker.io"][0].credentials.from: required key is missing',
        ),
        (
            "containerd: {mirrors: {docker.io: {mirrorOnly: true}}}",
            'containerd.mirrors["docker.io"].mirrors: required key is missing',
        ),
        (
            "containerd: {mirrors: {docker.io: {mirrorOnly: true, mirrors: []}}}",
            'containerd.mirrors["docker.io"].mirrors: must list at least 1 item',
        ),
        (
            "containerd: {mirrors: {docker.io: {mirrors: [{endpoint: 'http://m:1'}], upstream: false}}}",
            'containerd.mirrors["docker.io"].upstream: unknown key',
        ),
    ],
)
def test_bad_mirror_settings_are_path_qualified(body: str, message: str) -> None:
    found = problems(body)
    assert any(p.startswith(message) for p in found), found


def test_json_schema_accepts_both_forms_and_rejects_unknown_keys() -> None:
    schema = json_schema()
    for body in (
        "containerd: {mirrors: {docker.io: [{endpoint: 'http://m:1', credentials: {from: provider}}]}}",
        "containerd: {mirrors: {docker.io: {mirrorOnly: true, mirrors: [{endpoint: 'http://m:1'}]}}}",
    ):
        jsonschema.validate(yaml.safe_load(HEADER + body), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(
            yaml.safe_load(HEADER + "containerd: {mirrors: {docker.io: {mirrorsOnly: true, mirrors: []}}}"),
            schema,
        )
