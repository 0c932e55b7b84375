"""The config loader: what users see for valid and invalid configs (message texts are pinned)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent.config import AUTO, Config, ConfigError, default_config, load, load_text
from nodeagent.config import model as m

REPO = Path(__file__).resolve().parents[3]
HEAD = "apiVersion: nodeagent.io/v1alpha1\nkind: NodeAgentConfig\n"


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as e:
        load_text(text)
    return [str(p) for p in e.value.problems]


def test_design_sample_validates_and_builds_the_typed_config() -> None:
    c = load(REPO / "tests/data/design-sample.yaml")
    assert c.cri.endpoint == "unix:///run/containerd/containerd.sock"
    assert c.kubelet.max_parallel_image_pulls == AUTO
    assert c.kubelet.image_minimum_gc_age == 120.0
    assert c.containerd.image_pull_progress_timeout == 300.0
    docker = c.containerd.mirrors_of("docker.io")
    assert [x.endpoint for x in docker] == [
        "https://111122223333.dkr.ecr.us-west-2.amazonaws.com/v2/docker-hub",
        "http://127.0.0.1:4001",
    ]
    assert docker[0].override_path is True
    assert docker[1].dial_timeout == 0.5
    assert docker[1].capabilities == ("pull", "resolve")
    assert c.images.prefetch == (
        m.PrefetchImage("public.ecr.aws/eks-distro/kubernetes/pause:3.10", pin=True, required=True),
    )
    assert c.images.protect == ("public.ecr.aws/eks-distro/*",)
    assert c.eviction.min_unused_age == 600.0
    assert c.metrics.listen == "0.0.0.0:9847"


def test_minimal_config_is_all_defaults_and_matches_the_model_defaults() -> None:
    assert load_text(HEAD) == default_config() == Config()


def test_go_durations_become_seconds() -> None:
    c = load_text(
        HEAD + "kubelet:\n  imageMinimumGCAge: 1h30m\n  imageMaximumGCAge: 2h\n"
        "eviction:\n  minUnusedAge: 1.5m\n  interval: 1s\ncri:\n  timeout: 500ms\n"
    )
    assert c.kubelet.image_minimum_gc_age == 5400.0
    assert c.kubelet.image_maximum_gc_age == 7200.0
    assert c.eviction.min_unused_age == 90.0
    assert c.cri.timeout == 0.5


def test_mirror_optional_fields_and_scalar_shorthands() -> None:
    c = load_text(
        HEAD + "containerd:\n  mirrors:\n    _default:\n      - endpoint: https://m.example.com\n"
        "        ca: /etc/pki/m.pem\n        skipVerify: true\n        capabilities: [pull]\n"
        "        header:\n          X-Token: abc\n          X-Multi: [a, b]\n"
        "    'registry.local:5000':\n      - endpoint: http://[fd00::1]:5000\n"
    )
    (mirror,) = c.containerd.mirrors_of("_default")
    assert mirror.ca == ("/etc/pki/m.pem",)
    assert mirror.skip_verify is True
    assert mirror.capabilities == ("pull",)
    assert mirror.header == (("X-Token", ("abc",)), ("X-Multi", ("a", "b")))
    assert [r for r, _ in c.containerd.mirrors] == ["_default", "registry.local:5000"]


def test_proxy_socket_may_be_empty_and_numbers_and_auto_are_kept() -> None:
    c = load_text(
        HEAD + 'cri:\n  proxySocket: ""\nkubelet:\n  maxParallelImagePulls: 8\n'
        "containerd:\n  maxConcurrentDownloads: 3\nmetrics:\n  listen: '[::]:9847'\n"
    )
    assert c.cri.proxy_socket == ""
    assert c.kubelet.max_parallel_image_pulls == 8
    assert c.containerd.max_concurrent_downloads == 3
    assert c.metrics.listen == "[::]:9847"


def test_eviction_imagefs_path_is_optional_and_absolute() -> None:
    assert load_text(HEAD).eviction.imagefs_path == ""
    c = load_text(HEAD + "eviction:\n  imagefsPath: /var/lib/containerd\n")
    assert c.eviction.imagefs_path == "/var/lib/containerd"
    assert problems(HEAD + "eviction:\n  imagefsPath: var/lib\n") == [
        "eviction.imagefsPath: must be an absolute path (line 4)"
    ]
    assert problems(HEAD + "eviction:\n  imagefsPath: /var/../etc\n") == [
        "eviction.imagefsPath: path must not contain '..' (line 4)"
    ]


# Each case: (id, config text after the apiVersion/kind header, exact problem lines)
INVALID: list[tuple[str, str, list[str]]] = [
    (
        "yaml-syntax-error",
        "kubelet:\n  registryBurst: 1\n bad: [\n",
        ["<string>: invalid YAML: expected <block end>, but found '<block mapping start>' (line 5)"],
    ),
    (
        "yaml-tab-indent",
        "kubelet:\n\tregistryBurst: 1\n",
        ["<string>: invalid YAML: found character '\\t' that cannot start any token (line 4)"],
    ),
    (
        "duplicate-key",
        "kubelet:\n  registryBurst: 1\n  registryBurst: 2\n",
        ["kubelet.registryBurst: duplicate key (first at line 4) (line 5)"],
    ),
    (
        "unknown-top-level-key-with-hint",
        "evictoin:\n  enabled: false\n",
        ["evictoin: unknown key (did you mean 'eviction'?) (line 3)"],
    ),
    (
        "unknown-key-case-hint",
        "kubelet:\n  registryPullQps: 5\n",
        ["kubelet.registryPullQps: unknown key (did you mean 'registryPullQPS'?) (line 4)"],
    ),
    (
        "unknown-key-no-hint",
        "metrics:\n  zzz: 1\n",
        ["metrics.zzz: unknown key (expected one of: listen, perImageSeriesLimit) (line 4)"],
    ),
    (
        "wrong-type-bool",
        "kubelet:\n  serializeImagePulls: 'no'\n",
        ["kubelet.serializeImagePulls: expected true or false, got a string 'no' (line 4)"],
    ),
    (
        "wrong-type-int-as-string",
        "kubelet:\n  registryPullQPS: '10'\n",
        ["kubelet.registryPullQPS: expected an integer, got a string '10' (line 4)"],
    ),
    (
        "wrong-type-section-not-mapping",
        "eviction: [1, 2]\n",
        ["eviction: expected a mapping, got a list (line 3)"],
    ),
    (
        "auto-not-allowed-here",
        "kubelet:\n  registryBurst: auto\n",
        ["kubelet.registryBurst: expected an integer, got a string 'auto' (line 4)"],
    ),
    (
        "bad-auto-spelling",
        "kubelet:\n  maxParallelImagePulls: Auto\n",
        ["kubelet.maxParallelImagePulls: expected an integer or 'auto', got a string 'Auto' (line 4)"],
    ),
    (
        "percent-out-of-range",
        "kubelet:\n  imageGCHighThresholdPercent: 101\n",
        ["kubelet.imageGCHighThresholdPercent: must be between 0 and 100, got 101 (line 4)"],
    ),
    (
        "negative-qps",
        "kubelet:\n  registryPullQPS: -1\n",
        ["kubelet.registryPullQPS: must be between 0 and 2147483647, got -1 (line 4)"],
    ),
    (
        "max-parallel-zero",
        "kubelet:\n  maxParallelImagePulls: 0\n",
        ["kubelet.maxParallelImagePulls: must be between 1 and 2147483647, got 0 (line 4)"],
    ),
    (
        "series-limit-too-big",
        "metrics:\n  perImageSeriesLimit: 10001\n",
        ["metrics.perImageSeriesLimit: must be between 0 and 10000, got 10001 (line 4)"],
    ),
    (
        "kubelet-gc-low-not-below-high",
        "kubelet:\n  imageGCHighThresholdPercent: 80\n  imageGCLowThresholdPercent: 80\n",
        [
            "kubelet.imageGCLowThresholdPercent: must be less than "
            "kubelet.imageGCHighThresholdPercent (80), got 80 (line 5)"
        ],
    ),
    (
        "mirror-health-timeout-above-interval",
        "containerd:\n  mirrorHealth:\n    interval: 1s\n    timeout: 2s\n",
        [
            "containerd.mirrorHealth.timeout: must not exceed containerd.mirrorHealth.interval (1s), "
            "got 2s (line 6)"
        ],
    ),
    (
        "eviction-low-above-high",
        "eviction:\n  highThresholdPercent: 60\n  lowThresholdPercent: 70\n",
        [
            "eviction.lowThresholdPercent: must be less than eviction.highThresholdPercent "
            "(60), got 70 (line 5)"
        ],
    ),
    (
        "parallel-pulls-with-serialize",
        "kubelet:\n  serializeImagePulls: true\n  maxParallelImagePulls: 4\n",
        [
            "kubelet.maxParallelImagePulls: must be 1 when kubelet.serializeImagePulls is true "
            "(the kubelet refuses larger values), got 4 (line 5)"
        ],
    ),
    (
        "auto-parallel-pulls-with-serialize",
        "kubelet:\n  serializeImagePulls: true\n",
        [
            "kubelet.maxParallelImagePulls: 'auto' requires kubelet.serializeImagePulls: false "
            "(set 1 to serialize pulls) (line 4)"
        ],
    ),
    (
        "max-gc-age-not-above-min",
        "kubelet:\n  imageMinimumGCAge: 10m\n  imageMaximumGCAge: 5m\n",
        [
            "kubelet.imageMaximumGCAge: must be 0s (off) or greater than kubelet.imageMinimumGCAge (10m), "
            "got 5m (line 5)"
        ],
    ),
    (
        "bad-duration-words",
        "eviction:\n  minUnusedAge: 10 minutes\n",
        [
            "eviction.minUnusedAge: invalid duration '10 minutes': expected a duration such as "
            "'500ms', '30s', '10m' or '1h30m' (line 4)"
        ],
    ),
    (
        "bad-duration-no-unit",
        "eviction:\n  interval: 30\n",
        [
            "eviction.interval: got an integer 30: expected a duration such as "
            "'500ms', '30s', '10m' or '1h30m' (line 4)"
        ],
    ),
    (
        "negative-duration",
        "kubelet:\n  imageMinimumGCAge: -2m\n",
        ["kubelet.imageMinimumGCAge: must not be negative, got -2m (line 4)"],
    ),
    (
        "duration-below-minimum",
        "eviction:\n  interval: 500ms\n",
        ["eviction.interval: must be at least 1s, got 500ms (line 4)"],
    ),
    (
        "mirror-url-not-http",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: ftp://mirror.example.com\n",
        ['containerd.mirrors["docker.io"][0].endpoint: must be an http:// or https:// URL (line 6)'],
    ),
    (
        "mirror-url-no-host",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: 'https:///v2'\n",
        ['containerd.mirrors["docker.io"][0].endpoint: URL has no host (line 6)'],
    ),
    (
        "mirror-url-with-credentials-not-echoed",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://me:s3cret@mirror.example.com\n",
        [
            'containerd.mirrors["docker.io"][0].endpoint: must not contain credentials (user:password@); '
            "use header or a credential provider (line 6)"
        ],
    ),
    (
        "mirror-url-bad-port",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: http://m.example.com:99999\n",
        ['containerd.mirrors["docker.io"][0].endpoint: URL port must be between 1 and 65535 (line 6)'],
    ),
    (
        "mirror-missing-endpoint",
        "containerd:\n  mirrors:\n    docker.io:\n      - overridePath: true\n",
        ['containerd.mirrors["docker.io"][0].endpoint: required key is missing (line 6)'],
    ),
    (
        "mirror-empty-list",
        "containerd:\n  mirrors:\n    docker.io: []\n",
        ['containerd.mirrors["docker.io"]: must list at least 1 item (line 5)'],
    ),
    (
        "mirror-duplicate-endpoint",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        "      - endpoint: https://m.example.com/\n",
        [
            'containerd.mirrors["docker.io"][1].endpoint: duplicate endpoint '
            '(same as containerd.mirrors["docker.io"][0]) (line 7)'
        ],
    ),
    (
        "registry-path-traversal",
        "containerd:\n  mirrors:\n    ../../etc:\n      - endpoint: https://m.example.com\n",
        [
            "containerd.mirrors[\"../../etc\"]: not a registry host: '/', '\\', '..', NUL and a leading "
            "'.' are not allowed (the name becomes a directory under hostsDir) (line 5)"
        ],
    ),
    (
        "registry-dotdot",
        "containerd:\n  mirrors:\n    '..':\n      - endpoint: https://m.example.com\n",
        [
            "containerd.mirrors[\"..\"]: not a registry host: '/', '\\', '..', NUL and a leading "
            "'.' are not allowed (the name becomes a directory under hostsDir) (line 5)"
        ],
    ),
    (
        "registry-backslash",
        "containerd:\n  mirrors:\n    'a\\b':\n      - endpoint: https://m.example.com\n",
        [
            "containerd.mirrors[\"a\\\\b\"]: not a registry host: '/', '\\', '..', NUL and a leading "
            "'.' are not allowed (the name becomes a directory under hostsDir) (line 5)"
        ],
    ),
    (
        "registry-nul-escaped-in-path",
        'containerd:\n  mirrors:\n    "x\\0y":\n      - endpoint: https://m.example.com\n',
        [
            "containerd.mirrors[\"x\\x00y\"]: not a registry host: '/', '\\', '..', NUL and a leading "
            "'.' are not allowed (the name becomes a directory under hostsDir) (line 5)"
        ],
    ),
    (
        "registry-trailing-newline",
        'containerd:\n  mirrors:\n    "docker.io\\n":\n      - endpoint: https://m.example.com\n',
        [
            'containerd.mirrors["docker.io\\x0a"]: not a registry host: invalid host name '
            "(expected host, host:port, [IPv6]:port or _default) (line 5)"
        ],
    ),
    (
        "registry-bad-port",
        "containerd:\n  mirrors:\n    'registry.local:0':\n      - endpoint: https://m.example.com\n",
        [
            'containerd.mirrors["registry.local:0"]: not a registry host: port must be '
            "between 1 and 65535 (line 5)"
        ],
    ),
    (
        "registry-invalid-host",
        "containerd:\n  mirrors:\n    'under_score.io':\n      - endpoint: https://m.example.com\n",
        [
            'containerd.mirrors["under_score.io"]: not a registry host: invalid host name '
            "(expected host, host:port, [IPv6]:port or _default) (line 5)"
        ],
    ),
    (
        "registry-same-name-different-case",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://a.example.com\n"
        "    Docker.IO:\n      - endpoint: https://b.example.com\n",
        ['containerd.mirrors["Docker.IO"]: same key as containerd.mirrors["docker.io"] (line 7)'],
    ),
    (
        "capability-unknown",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        "        capabilities: [pull, fetch]\n",
        [
            "containerd.mirrors[\"docker.io\"][0].capabilities[1]: must be one of 'pull', 'resolve', 'push'; "
            "got 'fetch' (line 7)"
        ],
    ),
    (
        "header-bad-name",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        "        header:\n          'X Token': abc\n",
        [
            'containerd.mirrors["docker.io"][0].header["X Token"]: not a valid HTTP header name '
            "(letters, digits and !#$%&'*+-.^_`|~ only) (line 8)"
        ],
    ),
    (
        "header-value-with-newline-not-echoed",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        '        header:\n          Authorization: "Bearer s3cret\\r\\nX: y"\n',
        [
            'containerd.mirrors["docker.io"][0].header["Authorization"]: header value must be printable '
            "ASCII without line breaks (value not shown) (line 8)"
        ],
    ),
    (
        "header-value-wrong-type-not-echoed",
        "containerd:\n  mirrors:\n    docker.io:\n      - endpoint: https://m.example.com\n"
        "        header:\n          Authorization: 12345678\n",
        [
            'containerd.mirrors["docker.io"][0].header["Authorization"]: expected a string, '
            "got an integer (line 8)"
        ],
    ),
    (
        "hosts-dir-relative",
        "containerd:\n  hostsDir: etc/containerd/certs.d\n",
        ["containerd.hostsDir: must be an absolute path (line 4)"],
    ),
    (
        "hosts-dir-traversal",
        "containerd:\n  hostsDir: /etc/containerd/../../tmp\n",
        ["containerd.hostsDir: path must not contain '..' (line 4)"],
    ),
    (
        "cri-endpoint-not-unix",
        "cri:\n  endpoint: tcp://127.0.0.1:1234\n",
        ["cri.endpoint: must be a unix socket endpoint: unix:///absolute/path (line 4)"],
    ),
    (
        "proxy-socket-too-long",
        "cri:\n  proxySocket: /" + "a" * 120 + "\n",
        ["cri.proxySocket: socket path is longer than 107 bytes (the unix socket limit) (line 4)"],
    ),
    (
        "metrics-listen-no-port",
        "metrics:\n  listen: 0.0.0.0\n",
        [
            "metrics.listen: must be host:port (for example 0.0.0.0:9847, 127.0.0.1:9847 or [::]:9847) "
            "(line 4)"
        ],
    ),
    (
        "metrics-listen-bad-ipv6",
        "metrics:\n  listen: '[::g]:9847'\n",
        ["metrics.listen: invalid IPv6 address (line 4)"],
    ),
    (
        "image-reference-uppercase",
        "images:\n  prefetch:\n    - image: docker.io/Library/Nginx:1.25\n",
        ["images.prefetch[0].image: invalid image reference: repository name must be lowercase (line 5)"],
    ),
    (
        "image-reference-garbage",
        "images:\n  prefetch:\n    - image: 'nginx:'\n",
        [
            "images.prefetch[0].image: invalid image reference (expected "
            "[registry/]repository[:tag][@digest]) "
            "(line 5)"
        ],
    ),
    (
        "image-reference-short-digest",
        "images:\n  prefetch:\n    - image: nginx@sha256:abc\n",
        [
            "images.prefetch[0].image: invalid image reference (expected "
            "[registry/]repository[:tag][@digest]) "
            "(line 5)"
        ],
    ),
    (
        "prefetch-duplicate-image",
        "images:\n  prefetch:\n    - image: nginx\n    - image: docker.io/library/nginx:latest\n",
        ["images.prefetch[1].image: duplicate image (same as images.prefetch[0]) (line 6)"],
    ),
    (
        "prefetch-item-not-mapping",
        "images:\n  prefetch:\n    - nginx:1.25\n",
        ["images.prefetch[0]: expected a mapping, got a string 'nginx:1.25' (line 5)"],
    ),
    (
        "protect-unclosed-bracket",
        "images:\n  protect: ['registry.k8s.io/[a-z*']\n",
        ["images.protect[0]: invalid pattern: unclosed '[' (line 4)"],
    ),
    (
        "api-version-wrong",
        None,  # replaced below: a file with the wrong apiVersion
        ["apiVersion: must be 'nodeagent.io/v1alpha1', got 'v1' (line 1)"],
    ),
    (
        "kind-missing",
        None,
        ["kind: required key is missing (line 1)"],
    ),
]

WHOLE_FILE = {
    "api-version-wrong": "apiVersion: v1\nkind: NodeAgentConfig\n",
    "kind-missing": "apiVersion: nodeagent.io/v1alpha1\n",
}


def _text(case_id: str, body: str | None) -> str:
    return WHOLE_FILE[case_id] if body is None else HEAD + body


@pytest.mark.parametrize(
    ("body", "expected"), [(b, e) for _, b, e in INVALID], ids=[i for i, _, _ in INVALID]
)
def test_invalid_config_reports_exact_problem(
    body: str | None, expected: list[str], request: pytest.FixtureRequest
) -> None:
    case_id = request.node.callspec.id
    assert problems(_text(case_id, body)) == expected


def test_there_are_at_least_30_distinct_invalid_cases() -> None:
    assert len({i for i, _, _ in INVALID}) >= 30
    assert len({e[0] for _, _, e in INVALID}) >= 30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "",
            "<string>: the file is empty; a config starts with 'apiVersion: nodeagent.io/v1alpha1' and "
            "'kind: NodeAgentConfig' (a commented example: docs/config.example.yaml)",
        ),
        (
            "# only a comment\n",
            "<string>: the file is empty; a config starts with 'apiVersion: nodeagent.io/v1alpha1' and "
            "'kind: NodeAgentConfig' (a commented example: docs/config.example.yaml)",
        ),
        (
            "- a\n- b\n",
            "<string>: the top level must be a mapping of keys (apiVersion, kind, ...), got a list (line 1)",
        ),
        (
            "just text\n",
            "<string>: the top level must be a mapping of keys (apiVersion, kind, ...), got "
            "a single value (line 1)",
        ),
        (
            "a: 1\n---\nb: 2\n",
            "<string>: invalid YAML: expected a single document in the stream, but found "
            "another document (line 2)",
        ),
    ],
    ids=["empty", "comment-only", "list", "scalar", "two-documents"],
)
def test_document_level_problems(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_many_problems_are_all_reported_once_in_file_order() -> None:
    text = HEAD + (
        "cri:\n  endpoint: /run/containerd.sock\n"  # 4
        "kubelet:\n  registryPullQps: 5\n  imageGCHighThresholdPercent: 150\n"  # 6, 7
        "containerd:\n  mirrors:\n    ../etc:\n      - endpoint: https://m.example.com\n"  # 10
        "    docker.io:\n      - endpoint: ftp://x\n"  # 13
        "images:\n  prefetch:\n    - image: nginx\n    - image: nginx\n"  # 17
        "eviction:\n  highThresholdPercent: 60\n  lowThresholdPercent: 70\n  interval: 10 s\n"  # 20, 21
        "metrics:\n  listen: 9847\n"  # 23
        "extra: 1\n"  # 24
    )
    got = problems(text)
    assert [p.rsplit("(line ", 1)[1] for p in got] == [
        "4)",
        "6)",
        "7)",
        "10)",
        "13)",
        "17)",
        "20)",
        "21)",
        "23)",
        "24)",
    ]
    assert [p.split(":", 1)[0] for p in got] == [
        "cri.endpoint",
        "kubelet.registryPullQps",
        "kubelet.imageGCHighThresholdPercent",
        'containerd.mirrors["../etc"]',
        'containerd.mirrors["docker.io"][0].endpoint',
        "images.prefetch[1].image",
        "eviction.lowThresholdPercent",
        "eviction.interval",
        "metrics.listen",
        "extra",
    ]
    assert len(set(got)) == len(got)


def test_secrets_never_appear_in_messages() -> None:
    text = HEAD + (
        "containerd:\n  mirrors:\n    docker.io:\n"
        "      - endpoint: https://user:topsecret1@m.example.com\n"
        '        header:\n          Authorization: ["Bearer topsecret2\\n", 5]\n'
        "          'Bad Name': topsecret3\n"
    )
    with pytest.raises(ConfigError) as e:
        load_text(text)
    assert len(e.value.problems) == 4
    assert "topsecret" not in str(e.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path / "missing.yaml")
    assert [str(p) for p in e.value.problems] == [
        f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    ]


def test_not_utf8(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(HEAD.encode() + b"\xff\n")
    with pytest.raises(ConfigError) as e:
        load(f)
    assert [str(p) for p in e.value.problems] == [f"{f}: not UTF-8 text (byte 56)"]


def test_empty_sections_and_lists_mean_defaults() -> None:
    c = load_text(HEAD + "kubelet:\ncontainerd:\n  mirrors:\nimages:\n  prefetch:\n  protect:\n")
    assert c == default_config()


def test_null_scalar_is_a_type_error() -> None:
    assert problems(HEAD + "eviction:\n  enabled:\n") == [
        "eviction.enabled: expected true or false, got null (line 4)"
    ]


BILLION_LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    "b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\n"
    "d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\n"
    "f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("#" * (1 << 20) + "\n", "<string>: the file is larger than 1024 KiB"),
        (BILLION_LAUGHS, "<string>: more than 50000 YAML values (aliases expanding too far?)"),
        ("a: " + "[" * 40 + "]" * 40 + "\n", "<string>: nested more than 32 levels deep (line 1)"),
        ("a: " + "[" * 3000 + "]" * 3000 + "\n", "<string>: invalid YAML: nested too deeply"),
    ],
    ids=["too-large", "alias-bomb", "deep", "deeper-than-the-parser-stack"],
)
def test_hostile_documents_are_refused_within_bounds(text: str, expected: str) -> None:
    assert problems(text) == [expected]


def test_file_size_is_bounded_when_reading(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_bytes(HEAD.encode() + b"#" * (2 << 20))
    with pytest.raises(ConfigError) as e:
        load(f)
    assert [str(p) for p in e.value.problems] == [f"{f}: the file is larger than 1024 KiB"]
