"""The config schema: the single source of truth for every key of ``/etc/nodeagent/config.yaml``.

Types, defaults, ranges, enums and descriptions are declared here once. The loader
(``nodeagent.config.loader``) checks a document against ``SCHEMA`` and ``RULES`` and builds the typed
objects of ``nodeagent.config.model``; ``scripts/gen_schema.py`` renders the same declarations as
``docs/config.schema.json`` (JSON Schema draft 2020-12) and ``docs/configuration.md``.

Kubelet keys follow KubeletConfiguration v1beta1 and its validation
(kubernetes pkg/kubelet/apis/config/validation): GC thresholds 0..100 with low < high, QPS and burst
not negative, ``maxParallelImagePulls`` >= 1 and only above 1 when ``serializeImagePulls`` is false,
``imageMaximumGCAge`` either 0 or greater than ``imageMinimumGCAge``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nodeagent import imageref
from nodeagent.config import formats as fmt
from nodeagent.config import model as m
from nodeagent.config.formats import format_duration
from nodeagent.config.types import (
    JSON,
    Bool,
    CheckedObject,
    Ctx,
    Duration,
    Field,
    Int,
    List,
    ListOrObject,
    Loc,
    Map,
    Object,
    Str,
)

API_VERSION = "nodeagent.io/v1alpha1"
KIND = "NodeAgentConfig"
INT32_MAX = 2**31 - 1

CRI = Object(
    [
        Field(
            "endpoint",
            "endpoint",
            Str(fmt.UNIX_ENDPOINT),
            "CRI endpoint of the container runtime (containerd, or SOCI's image service) that nodeagent "
            "talks to and proxies image calls to.",
            default="unix:///run/containerd/containerd.sock",
        ),
        Field(
            "proxySocket",
            "proxy_socket",
            Str(fmt.SOCKET_PATH),
            "Unix socket where nodeagent serves the CRI ImageService proxy to the kubelet "
            '(`imageServiceEndpoint`). `""` turns the proxy off.',
            default="/run/nodeagent/cri.sock",
        ),
        Field(
            "proxyMaxConnections",
            "proxy_max_connections",
            Int(minimum=1, maximum=4096),
            "Client connections the proxy keeps at once (the kubelet needs one or two; crictl and "
            "monitoring agents one per call). At the limit the longest-idle connection is closed to "
            "admit a new one; with all of them busy the new one is refused. Each costs a 256 KiB "
            "receive window and a 1 MiB header block at most (docs/proxy.md, Bounds).",
            default=32,
        ),
        Field(
            "timeout",
            "timeout",
            Duration(minimum=0.1, maximum=600.0),
            "Deadline for short CRI calls (Version, ImageStatus, ListImages...). Pulls have their own.",
            default="10s",
        ),
    ],
    m.CriConfig,
    "The container runtime nodeagent talks to, and the proxy it serves to the kubelet.",
)

KUBELET = Object(
    [
        Field(
            "serializeImagePulls",
            "serialize_image_pulls",
            Bool(),
            "Kubelet `serializeImagePulls`: pull one image at a time. Must be false for parallel pulls.",
            default=False,
        ),
        Field(
            "maxParallelImagePulls",
            "max_parallel_image_pulls",
            Int(minimum=1, maximum=INT32_MAX, auto=True),
            "Kubelet `maxParallelImagePulls`: most image pulls in flight at once. `auto` sizes it from "
            "this node's CPUs, memory and NIC. Above 1 (or `auto`) requires `serializeImagePulls: false`.",
            default="auto",
            examples=["auto", 5],
        ),
        Field(
            "registryPullQPS",
            "registry_pull_qps",
            Int(minimum=0, maximum=INT32_MAX),
            "Kubelet `registryPullQPS`: image pulls per second the kubelet starts; 0 means no limit.",
            default=10,
        ),
        Field(
            "registryBurst",
            "registry_burst",
            Int(minimum=0, maximum=INT32_MAX),
            "Kubelet `registryBurst`: pulls allowed in a burst above `registryPullQPS` "
            "(used only when `registryPullQPS` > 0).",
            default=20,
        ),
        Field(
            "imageGCHighThresholdPercent",
            "image_gc_high_threshold_percent",
            Int(minimum=0, maximum=100),
            "Kubelet `imageGCHighThresholdPercent`: disk usage that starts the kubelet's image GC. "
            "Must be above `imageGCLowThresholdPercent`.",
            default=85,
        ),
        Field(
            "imageGCLowThresholdPercent",
            "image_gc_low_threshold_percent",
            Int(minimum=0, maximum=100),
            "Kubelet `imageGCLowThresholdPercent`: disk usage the kubelet's image GC frees down to.",
            default=80,
        ),
        Field(
            "imageMinimumGCAge",
            "image_minimum_gc_age",
            Duration(),
            "Kubelet `imageMinimumGCAge`: an unused image younger than this is never garbage collected.",
            default="2m",
        ),
        Field(
            "imageMaximumGCAge",
            "image_maximum_gc_age",
            Duration(),
            "Kubelet `imageMaximumGCAge`: remove images unused for this long; `0s` turns it off. When "
            "set, must be greater than `imageMinimumGCAge` (needs the kubelet's ImageMaximumGCAge "
            "feature gate, on by default since Kubernetes 1.30).",
            default="0s",
        ),
    ],
    m.KubeletConfig,
    "Image-pull settings written into the kubelet's configuration by `nodeagent apply`.",
)


def _check_credentials(c: m.MirrorCredentials, loc: Loc, ctx: Ctx) -> None:
    if c.source == "file" and not c.path:
        ctx.add(loc.field("path"), "required with from: file (a file holding username:password)")
    elif c.source == "provider" and c.path:
        ctx.add(
            loc.field("path"),
            "not used with from: provider (the plugins come from images.credentialProviderConfig)",
        )
    elif c.source == "file" and c.image:
        ctx.add(loc.field("image"), "not used with from: file")


MIRROR_CREDENTIALS = CheckedObject(
    [
        Field(
            "from",
            "source",
            Str(enum=("provider", "dockerConfig", "file")),
            "Where the credentials come from: `provider` (the kubelet's image credential provider "
            "plugins, `images.credentialProviderConfig`, e.g. the ECR provider with the instance role), "
            "`dockerConfig` (an `auths` entry of a docker config.json) or `file` (one line "
            "`username:password`, re-read when it changes). They become an `Authorization` header of "
            "this mirror's `[host]` section only (file mode 0600), refreshed by `nodeagent run` before "
            "they expire.",
            required=True,
        ),
        Field(
            "image",
            "image",
            Str(fmt.IMAGE_REFERENCE),
            "`provider`/`dockerConfig`: the image name the credentials are looked up for (matched "
            "against `matchImages` / `auths` keys). Default: the mirror's host and path, e.g. "
            "`111122223333.dkr.ecr.us-west-2.amazonaws.com/docker-hub`.",
        ),
        Field(
            "path",
            "path",
            Str(fmt.ABS_PATH),
            "`dockerConfig`: the config.json (unset: `images.dockerConfig`); `file`: the credentials "
            "file (required).",
        ),
    ],
    m.MirrorCredentials,
    "Credentials nodeagent writes for this mirror (never logged, masked in diffs).",
    rule=_check_credentials,
)

MIRROR = Object(
    [
        Field(
            "endpoint",
            "endpoint",
            Str(fmt.HTTP_URL),
            'Mirror URL (containerd hosts.toml `[host."..."]`), for example an ECR pull-through cache, '
            "Harbor, Spegel or a local registry.",
            required=True,
            examples=["https://mirror.example.com", "http://127.0.0.1:5000"],
        ),
        Field(
            "capabilities",
            "capabilities",
            List(
                Str(enum=("pull", "resolve", "push")),
                min_items=1,
                unique=lambda c: c,
                unique_message="duplicate of {first}",
            ),
            "What the mirror may be used for: `pull` (fetch blobs by digest), `resolve` (tag to "
            "digest), `push`.",
            default=["pull", "resolve"],
        ),
        Field(
            "skipVerify",
            "skip_verify",
            Bool(),
            "Skip TLS certificate verification for this mirror (hosts.toml `skip_verify`).",
            default=False,
        ),
        Field(
            "ca",
            "ca",
            List(Str(fmt.ABS_PATH), scalar_ok=True),
            "CA certificate file(s) to trust for this mirror (hosts.toml `ca`).",
            default=[],
        ),
        Field(
            "overridePath",
            "override_path",
            Bool(),
            "The endpoint's path is the full API root (hosts.toml `override_path`), as for ECR "
            "pull-through caches under `/v2/<prefix>`.",
            default=False,
        ),
        Field(
            "header",
            "header",
            Map(
                fmt.HEADER_NAME,
                List(Str(fmt.HEADER_VALUE, secret=True), scalar_ok=True, min_items=1),
                max_items=64,
            ),
            "Extra HTTP headers sent to the mirror (hosts.toml `header`). Values may be tokens: they are "
            "never printed.",
            default={},
        ),
        Field(
            "dialTimeout",
            "dial_timeout",
            Duration(minimum=0.001, maximum=300.0),
            "Connect timeout for this mirror (hosts.toml `dial_timeout`); unset uses containerd's.",
        ),
        Field(
            "credentials",
            "credentials",
            MIRROR_CREDENTIALS,
            MIRROR_CREDENTIALS.description,
        ),
    ],
    m.Mirror,
    "One mirror of a registry.",
)


MIRROR_HEALTH = Object(
    [
        Field(
            "enabled",
            "enabled",
            Bool(),
            "Probe every mirror and take one that stops answering out of its registry's hosts.toml "
            "until it recovers (the daemon, `nodeagent run`).",
            default=True,
        ),
        Field(
            "interval",
            "interval",
            Duration(minimum=0.1, maximum=3600.0),
            "Time between probes of one mirror (with jitter).",
            default="2s",
        ),
        Field(
            "timeout",
            "timeout",
            Duration(minimum=0.01, maximum=60.0),
            "Deadline of one probe (connect and answer). Must not exceed `interval`.",
            default="1s",
        ),
        Field(
            "failuresBeforeDown",
            "failures_before_down",
            Int(minimum=1, maximum=100),
            "Consecutive failed probes that take a mirror out.",
            default=3,
        ),
        Field(
            "successesBeforeUp",
            "successes_before_up",
            Int(minimum=1, maximum=100),
            "Consecutive good probes that bring a mirror back.",
            default=5,
        ),
        Field(
            "holdTime",
            "hold_time",
            Duration(maximum=86400.0),
            "At most one hosts.toml rewrite per mirror per this long (stops flapping).",
            default="1m",
        ),
    ],
    m.MirrorHealthConfig,
    "Mirror health checks and fail-over (issue 8).",
)


SOCI = Object(
    [
        Field(
            "pullMode",
            "pull_mode",
            Str(enum=("parallel", "lazy", "off")),
            "How SOCI pulls images: `parallel` downloads large layers in chunks over many connections "
            "and unpacks several layers at once (any image, any registry); `lazy` starts containers "
            "before their images are downloaded (images with a SOCI index; needs FUSE and containerd "
            "1.7.16 or newer); `off` pulls as containerd does, through the SOCI snapshotter.",
            default="parallel",
        ),
        Field(
            "maxConcurrentDownloads",
            "max_concurrent_downloads",
            Int(minimum=1, maximum=1000, auto=True),
            "Parallel mode: chunk downloads in flight on this node, all images together.",
            default="auto",
            examples=["auto", 40],
        ),
        Field(
            "maxConcurrentDownloadsPerImage",
            "max_concurrent_downloads_per_image",
            Int(minimum=1, maximum=100, auto=True),
            "Parallel mode: chunk downloads (registry connections) in flight for one image.",
            default="auto",
            examples=["auto", 10],
        ),
        Field(
            "chunkSizeMiB",
            "chunk_size_mib",
            Int(minimum=1, maximum=1024, auto=True),
            "Parallel mode: size of one ranged download of a layer, MiB.",
            default="auto",
            examples=["auto", 16],
        ),
        Field(
            "maxConcurrentUnpacks",
            "max_concurrent_unpacks",
            Int(minimum=1, maximum=256, auto=True),
            "Parallel mode: layers unpacked at once on this node, all images together.",
            default="auto",
        ),
        Field(
            "maxConcurrentUnpacksPerImage",
            "max_concurrent_unpacks_per_image",
            Int(minimum=1, maximum=64, auto=True),
            "Parallel mode: layers of one image unpacked at once.",
            default="auto",
        ),
        Field(
            "discardUnpackedLayers",
            "discard_unpacked_layers",
            Bool(),
            "Parallel mode: drop a layer's compressed blob once it is unpacked (less disk; a Spegel "
            "mirror then has nothing to serve).",
            default=True,
        ),
        Field(
            "imagefsThroughputMBps",
            "imagefs_throughput_mbps",
            Int(minimum=0, maximum=100000),
            "Write throughput of the image filesystem in MB/s (e.g. an EBS volume's provisioned "
            "throughput), used to size unpacks; `0`: unknown, not a limit.",
            default=0,
        ),
        Field(
            "configFile",
            "config_file",
            Str(fmt.ABS_PATH),
            "The soci-snapshotter-grpc config file `nodeagent apply` writes.",
            default="/etc/soci-snapshotter-grpc/config.toml",
        ),
        Field(
            "address",
            "address",
            Str(fmt.ABS_PATH),
            "soci-snapshotter-grpc's socket (containerd's `proxy_plugins.soci.address`).",
            default="/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock",
        ),
        Field(
            "root",
            "root",
            Str(fmt.ABS_PATH),
            "soci-snapshotter-grpc's root directory, where its snapshots live (what eviction measures).",
            default="/var/lib/soci-snapshotter-grpc",
        ),
        Field(
            "restartCommand",
            "restart_command",
            List(Str(), max_items=32),
            "Command (argv, no shell) `nodeagent apply` runs to restart soci-snapshotter-grpc after "
            "changing its config (generic flavor), before containerd is restarted. `[]` never restarts.",
            default=["systemctl", "restart", "soci-snapshotter"],
        ),
    ],
    m.SociConfig,
    "The SOCI snapshotter (used when `snapshotter: soci`): pull mode and concurrency.",
)


def _mirror_endpoint(mirror: m.Mirror) -> str:
    return mirror.endpoint.rstrip("/")


MIRROR_LIST = List(
    MIRROR,
    min_items=1,
    max_items=32,
    unique=_mirror_endpoint,
    unique_message="duplicate endpoint (same as {first})",
    unique_at="endpoint",
    noun="mirror",
)

REGISTRY_MIRRORS = ListOrObject(
    MIRROR_LIST,
    Object(
        [
            Field("mirrors", "mirrors", MIRROR_LIST, "The registry's mirrors, in order.", required=True),
            Field(
                "mirrorOnly",
                "mirror_only",
                Bool(),
                "Never go to the registry itself: hosts.toml gets no upstream `server` (the last "
                "mirror is written as `server`), so pulls use only the mirrors. Mirror health then "
                "never takes the last mirror out (it reports it down) and pulls fail fast while no "
                "mirror is up. The trade-off: a mirror outage stops every pull from this registry.",
                default=False,
            ),
        ],
        m.RegistryMirrors,
        "A registry's mirrors, long form.",
    ),
    lambda mirrors: m.RegistryMirrors(mirrors=mirrors),
    # the typed config holds each registry's mirrors as a tuple (mirror-only registries apart)
    shown=lambda e: MIRROR_LIST.show(e.mirrors if isinstance(e, m.RegistryMirrors) else e),
)


def _build_containerd(**kwargs: Any) -> m.ContainerdConfig:
    entries = kwargs.pop("mirrors", ())
    kwargs["mirrors"] = tuple((name, e.mirrors) for name, e in entries)
    kwargs["mirror_only"] = frozenset(name for name, e in entries if e.mirror_only)
    return m.ContainerdConfig(**kwargs)


# for the schema's own tests: the model it builds, and the model fields derived from other keys
_build_containerd.model = m.ContainerdConfig  # type: ignore[attr-defined]
_build_containerd.derived = frozenset({"mirror_only"})  # type: ignore[attr-defined]


CONTAINERD = Object(
    [
        Field(
            "maxConcurrentDownloads",
            "max_concurrent_downloads",
            Int(minimum=1, maximum=1000, auto=True),
            "containerd CRI `max_concurrent_downloads`: layers downloaded at once per pull. `auto` sizes "
            "it from this node's CPUs and NIC.",
            default="auto",
            examples=["auto", 6],
        ),
        Field(
            "imagePullProgressTimeout",
            "image_pull_progress_timeout",
            Duration(),
            "containerd CRI `image_pull_progress_timeout`: cancel a pull that made no progress for this "
            "long; `0s` turns it off.",
            default="5m",
        ),
        Field(
            "hostsDir",
            "hosts_dir",
            Str(fmt.ABS_PATH),
            "containerd registry `config_path`: where `<registry>/hosts.toml` files are written.",
            default="/etc/containerd/certs.d",
        ),
        Field(
            "mirrors",
            "mirrors",
            Map(fmt.REGISTRY_HOST, REGISTRY_MIRRORS, max_items=256, key_identity=str.lower),
            "Registry host (or `_default` for all registries) to its ordered list of mirrors, or to "
            "`{mirrors: [...], mirrorOnly: true}`. Each becomes `<hostsDir>/<registry>/hosts.toml`; "
            "mirrors are tried in order, then the registry (never, with `mirrorOnly`).",
            default={},
        ),
        Field("mirrorHealth", "mirror_health", MIRROR_HEALTH, MIRROR_HEALTH.description),
        Field(
            "restartCommand",
            "restart_command",
            List(Str(), max_items=32),
            "Command (argv, no shell) `nodeagent apply` runs to restart containerd after changing its "
            "config (generic flavor). If CRI Version does not answer afterwards, the previous config is "
            "restored and containerd restarted again. `[]` never restarts.",
            default=["systemctl", "restart", "containerd"],
        ),
        Field(
            "snapshotter",
            "snapshotter",
            Str(enum=("overlayfs", "soci")),
            "The snapshotter CRI pulls and runs images with: `overlayfs` (containerd's own) or `soci` "
            "(the SOCI snapshotter as a containerd proxy plugin; settings under `soci`).",
            default="overlayfs",
        ),
        Field("soci", "soci", SOCI, SOCI.description),
    ],
    _build_containerd,
    "containerd image settings and registry mirrors written by `nodeagent apply`.",
)

PREFETCH_IMAGE = Object(
    [
        Field(
            "image",
            "image",
            Str(fmt.IMAGE_REFERENCE),
            "Image reference to pull.",
            required=True,
            examples=["public.ecr.aws/eks-distro/kubernetes/pause:3.10"],
        ),
        Field(
            "pin",
            "pin",
            Bool(),
            "Pin the image in containerd so that no garbage collection (kubelet or nodeagent) removes it.",
            default=False,
        ),
        Field(
            "required",
            "required",
            Bool(),
            "`nodeagent prefetch` fails (exit 1) when this image cannot be pulled.",
            default=False,
        ),
    ],
    m.PrefetchImage,
    "An image pulled before the kubelet starts.",
)

IMAGES = Object(
    [
        Field(
            "prefetch",
            "prefetch",
            List(
                PREFETCH_IMAGE,
                max_items=1000,
                unique=lambda p: imageref.normalize(p.image),
                unique_message="duplicate image (same as {first})",
                unique_at="image",
                noun="image",
            ),
            "Images `nodeagent prefetch` pulls through CRI at boot (and `--bake` at AMI build).",
            default=[],
        ),
        Field(
            "protect",
            "protect",
            List(Str(fmt.GLOB), max_items=1000, unique=lambda p: p),
            "Glob patterns of image references nodeagent never evicts.",
            default=[],
            examples=[["public.ecr.aws/eks-distro/*"]],
        ),
        Field(
            "prefetchConcurrency",
            "prefetch_concurrency",
            Int(minimum=1, maximum=64),
            "Images `nodeagent prefetch` pulls at the same time.",
            default=4,
        ),
        Field(
            "prefetchBudget",
            "prefetch_budget",
            Duration(minimum=1.0, maximum=3600.0),
            "Total time `nodeagent prefetch` may take (it holds the kubelet back at boot); pulls still "
            "running then are canceled. systemd's TimeoutStartSec for nodeagent-prefetch.service is the "
            "backstop just above the default: raise both together.",
            default="5m",
        ),
        Field(
            "credentialProviderConfig",
            "credential_provider_config",
            Str(fmt.ABS_PATH),
            "The kubelet's CredentialProviderConfig (`--image-credential-provider-config`); prefetch "
            "gets registry credentials from the same plugins the kubelet uses. A missing file means no "
            "plugins.",
            default="/etc/eks/image-credential-provider/config.json",
        ),
        Field(
            "credentialProviderBinDir",
            "credential_provider_bin_dir",
            Str(fmt.ABS_PATH),
            "Directory of the credential provider plugins (`--image-credential-provider-bin-dir`).",
            default="/etc/eks/image-credential-provider",
        ),
        Field(
            "dockerConfig",
            "docker_config",
            Str(fmt.ABS_PATH),
            "A docker `config.json` whose `auths` prefetch also uses (the kubelet reads the same file).",
            default="/var/lib/kubelet/config.json",
        ),
    ],
    m.ImagesConfig,
    "Images to prefetch at boot and images to protect from eviction.",
)

EVICTION = Object(
    [
        Field(
            "enabled",
            "enabled",
            Bool(),
            "Run nodeagent's image eviction loop in the daemon.",
            default=True,
        ),
        Field(
            "highThresholdPercent",
            "high_threshold_percent",
            Int(minimum=0, maximum=100),
            "Start removing unused images when the image filesystem is this full. Must be above "
            "`lowThresholdPercent`; keep it below `kubelet.imageGCHighThresholdPercent` so that "
            "nodeagent acts before the kubelet's image GC (`apply` warns otherwise).",
            default=75,
        ),
        Field(
            "lowThresholdPercent",
            "low_threshold_percent",
            Int(minimum=0, maximum=100),
            "Stop removing images once usage is down to this.",
            default=65,
        ),
        Field(
            "minUnusedAge",
            "min_unused_age",
            Duration(),
            "Never evict an image used more recently than this.",
            default="10m",
        ),
        Field(
            "interval",
            "interval",
            Duration(minimum=1.0, maximum=3600.0),
            "How often the eviction loop checks disk usage (it also checks after every pull).",
            default="30s",
        ),
        Field(
            "imagefsPath",
            "imagefs_path",
            Str(fmt.OPTIONAL_ABS_PATH),
            'A path on the image filesystem whose usage eviction measures (statvfs). `""`: the '
            "mountpoint the runtime reports in CRI ImageFsInfo (containerd: its snapshotter root).",
            default="",
        ),
    ],
    m.EvictionConfig,
    "Disk-aware image eviction by the daemon (`nodeagent run`).",
)

POD_PULLS = Object(
    [
        Field(
            "enabled",
            "enabled",
            Bool(),
            "Watch the pods bound to this node through the Kubernetes API and pull every image a new pod "
            "needs at once, before the kubelet asks for them one by one (docs/pod-pulls.md). Without a "
            "usable kubeconfig this part waits and says why; the proxy is never affected.",
            default=True,
        ),
        Field(
            "kubeconfig",
            "kubeconfig",
            Str(fmt.ABS_PATH),
            "The kubeconfig whose identity reads pods and their pull secrets: the kubelet's own (the node "
            "authorizer allows a node exactly this; no RBAC to install).",
            default="/var/lib/kubelet/kubeconfig",
        ),
        Field(
            "nodeName",
            "node_name",
            Str(fmt.OPTIONAL_NODE_NAME),
            "This node's name in the cluster. `\"\"`: the kubeconfig identity's name "
            "(`system:node:NAME`, as the API server reports it).",
            default="",
        ),
        Field(
            "concurrency",
            "concurrency",
            Int(minimum=1, maximum=64),
            "Image pulls nodeagent starts itself at once: pod pulls and `nodeagent prefetch` calls through "
            "the proxy share this limit (a pod's images are started before the next pod's); the kubelet's "
            "own pulls never wait for it.",
            default=4,
        ),
    ],
    m.PodPullsConfig,
    "Pod-aware pulls by the daemon (`nodeagent run`).",
)

METRICS = Object(
    [
        Field(
            "listen",
            "listen",
            Str(fmt.LISTEN),
            "Address of the Prometheus metrics and health endpoint.",
            default="0.0.0.0:9847",
        ),
        Field(
            "perImageSeriesLimit",
            "per_image_series_limit",
            Int(minimum=0, maximum=10000),
            "At most this many `image` series in `nodeagent_image_last_pull_duration_seconds` (least "
            "recent dropped); 0 turns the per-image metric off.",
            default=100,
        ),
    ],
    m.MetricsConfig,
    "The Prometheus endpoint of the daemon.",
)


def _build_config(**kwargs: Any) -> m.Config:
    kwargs.pop("api_version", None)
    kwargs.pop("kind", None)
    return m.Config(**kwargs)


SCHEMA = Object(
    [
        Field(
            "apiVersion",
            "api_version",
            Str(enum=(API_VERSION,)),
            "Version of this config format.",
            default=API_VERSION,  # only a placeholder so that the rest is checked: the key is required
            required=True,
        ),
        Field("kind", "kind", Str(enum=(KIND,)), "Always `NodeAgentConfig`.", default=KIND, required=True),
        Field("cri", "cri", CRI, CRI.description),
        Field("kubelet", "kubelet", KUBELET, KUBELET.description),
        Field("containerd", "containerd", CONTAINERD, CONTAINERD.description),
        Field("images", "images", IMAGES, IMAGES.description),
        Field("eviction", "eviction", EVICTION, EVICTION.description),
        Field("podPulls", "pod_pulls", POD_PULLS, POD_PULLS.description),
        Field("metrics", "metrics", METRICS, METRICS.description),
    ],
    _build_config,
    "nodeagent configuration (/etc/nodeagent/config.yaml).",
)


# --- cross-field rules --------------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A rule over several keys. ``check`` returns a message for ``paths[0]`` or None.

    Skipped when any of ``paths`` already has a problem. The problem's line is that of the first of
    ``paths`` written in the file.
    """

    paths: Sequence[str]
    doc: str
    check: Callable[[m.Config], str | None]


def _gc_thresholds(c: m.Config) -> str | None:
    k = c.kubelet
    if k.image_gc_low_threshold_percent >= k.image_gc_high_threshold_percent:
        return (
            f"must be less than kubelet.imageGCHighThresholdPercent ({k.image_gc_high_threshold_percent}), "
            f"got {k.image_gc_low_threshold_percent}"
        )
    return None


def _gc_ages(c: m.Config) -> str | None:
    k = c.kubelet
    if 0 < k.image_maximum_gc_age <= k.image_minimum_gc_age:
        return (
            f"must be 0s (off) or greater than kubelet.imageMinimumGCAge "
            f"({format_duration(k.image_minimum_gc_age)}), got {format_duration(k.image_maximum_gc_age)}"
        )
    return None


def _parallel_pulls(c: m.Config) -> str | None:
    k = c.kubelet
    if not k.serialize_image_pulls:
        return None
    if k.max_parallel_image_pulls == m.AUTO:
        return "'auto' requires kubelet.serializeImagePulls: false (set 1 to serialize pulls)"
    if isinstance(k.max_parallel_image_pulls, int) and k.max_parallel_image_pulls > 1:
        return (
            f"must be 1 when kubelet.serializeImagePulls is true (the kubelet refuses larger values), "
            f"got {k.max_parallel_image_pulls}"
        )
    return None


def _probe_timeout(c: m.Config) -> str | None:
    h = c.containerd.mirror_health
    if h.timeout > h.interval:
        return (
            f"must not exceed containerd.mirrorHealth.interval ({format_duration(h.interval)}), "
            f"got {format_duration(h.timeout)}"
        )
    return None


def _eviction_thresholds(c: m.Config) -> str | None:
    e = c.eviction
    if e.low_threshold_percent >= e.high_threshold_percent:
        return (
            f"must be less than eviction.highThresholdPercent ({e.high_threshold_percent}), "
            f"got {e.low_threshold_percent}"
        )
    return None


RULES: tuple[Rule, ...] = (
    Rule(
        ("kubelet.imageGCLowThresholdPercent", "kubelet.imageGCHighThresholdPercent"),
        "`kubelet.imageGCLowThresholdPercent` < `kubelet.imageGCHighThresholdPercent`",
        _gc_thresholds,
    ),
    Rule(
        ("kubelet.imageMaximumGCAge", "kubelet.imageMinimumGCAge"),
        "`kubelet.imageMaximumGCAge` is `0s` or greater than `kubelet.imageMinimumGCAge`",
        _gc_ages,
    ),
    Rule(
        ("kubelet.maxParallelImagePulls", "kubelet.serializeImagePulls"),
        "`kubelet.maxParallelImagePulls` above 1 or `auto` requires `kubelet.serializeImagePulls: false`",
        _parallel_pulls,
    ),
    Rule(
        ("containerd.mirrorHealth.timeout", "containerd.mirrorHealth.interval"),
        "`containerd.mirrorHealth.timeout` <= `containerd.mirrorHealth.interval`",
        _probe_timeout,
    ),
    Rule(
        ("eviction.lowThresholdPercent", "eviction.highThresholdPercent"),
        "`eviction.lowThresholdPercent` < `eviction.highThresholdPercent`",
        _eviction_thresholds,
    ),
)


# --- views of the schema -------------------------------------------------------------------------


def json_schema() -> JSON:
    """The schema as JSON Schema draft 2020-12 (cross-field rules are listed in ``$comment``)."""
    out: JSON = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://nodeagent.io/config.schema.json",
        "title": "NodeAgentConfig",
    }
    out.update(SCHEMA.json_schema())
    out["$comment"] = "Also enforced by `nodeagent validate`: " + "; ".join(r.doc for r in RULES) + "."
    return out


def differences(config: m.Config) -> list[tuple[str, str, str]]:
    """(path, value, default) for every setting of ``config`` that differs from the default.

    Secret values (mirror headers) are never rendered.
    """
    out: list[tuple[str, str, str]] = []

    def walk(obj: Object, value: Any, default: Any, prefix: str) -> None:
        for f in obj.fields:
            if f.attr in ("api_version", "kind"):
                continue
            path = f"{prefix}.{f.key}" if prefix else f.key
            v, d = getattr(value, f.attr), getattr(default, f.attr)
            if isinstance(f.type, Object):
                walk(f.type, v, d, path)
            elif v != d:
                dtext = f.type.show(d) if d is not None else "unset"
                out.append((path, f.type.show(v), dtext))

    from nodeagent.config.loader import default_config

    walk(SCHEMA, config, default_config(), "")
    return out
