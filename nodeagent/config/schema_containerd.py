"""Schema of ``containerd:``: registry mirrors (with their credentials), mirror health, the SOCI
snapshotter, and containerd's own image settings. Part of ``nodeagent.config.schema``."""

from __future__ import annotations

from typing import Any

from nodeagent.config import formats as fmt
from nodeagent.config import model as m
from nodeagent.config.objects import CheckedObject, Field, ListOrObject, Object
from nodeagent.config.problems import Ctx, Loc
from nodeagent.config.types import Bool, Duration, Int, List, Map, Str
from nodeagent.util.endpoints import without_trailing_slash


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
        ),
        Field(
            "skipVerify",
            "skip_verify",
            Bool(),
            "Skip TLS certificate verification for this mirror (hosts.toml `skip_verify`).",
        ),
        Field(
            "ca",
            "ca",
            List(Str(fmt.ABS_PATH), scalar_ok=True),
            "CA certificate file(s) to trust for this mirror (hosts.toml `ca`).",
        ),
        Field(
            "overridePath",
            "override_path",
            Bool(),
            "The endpoint's path is the full API root (hosts.toml `override_path`), as for ECR "
            "pull-through caches under `/v2/<prefix>`.",
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
        ),
        Field(
            "interval",
            "interval",
            Duration(minimum=0.1, maximum=3600.0),
            "Time between probes of one mirror (with jitter).",
        ),
        Field(
            "timeout",
            "timeout",
            Duration(minimum=0.01, maximum=60.0),
            "Deadline of one probe (connect and answer). Must not exceed `interval`.",
        ),
        Field(
            "failuresBeforeDown",
            "failures_before_down",
            Int(minimum=1, maximum=100),
            "Consecutive failed probes that take a mirror out.",
        ),
        Field(
            "successesBeforeUp",
            "successes_before_up",
            Int(minimum=1, maximum=100),
            "Consecutive good probes that bring a mirror back.",
        ),
        Field(
            "holdTime",
            "hold_time",
            Duration(maximum=86400.0),
            "At most one hosts.toml rewrite per mirror per this long (stops flapping).",
        ),
    ],
    m.MirrorHealthConfig,
    "Mirror health checks and fail-over (issue 8).",
)


def _mirror_endpoint(mirror: m.Mirror) -> str:
    return without_trailing_slash(mirror.endpoint)


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
            ),
        ],
        m.RegistryMirrors,
        "A registry's mirrors, long form.",
    ),
    lambda mirrors: m.RegistryMirrors(mirrors=mirrors),
    # the typed config holds each registry's mirrors as a tuple (mirror-only registries apart)
    shown=lambda e: MIRROR_LIST.show(e.mirrors if isinstance(e, m.RegistryMirrors) else e),
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
        ),
        Field(
            "maxConcurrentDownloads",
            "max_concurrent_downloads",
            Int(minimum=1, maximum=1000, auto=True),
            "Parallel mode: chunk downloads in flight on this node, all images together.",
            examples=["auto", 40],
        ),
        Field(
            "maxConcurrentDownloadsPerImage",
            "max_concurrent_downloads_per_image",
            Int(minimum=1, maximum=100, auto=True),
            "Parallel mode: chunk downloads (registry connections) in flight for one image.",
            examples=["auto", 10],
        ),
        Field(
            "chunkSizeMiB",
            "chunk_size_mib",
            Int(minimum=1, maximum=1024, auto=True),
            "Parallel mode: size of one ranged download of a layer, MiB.",
            examples=["auto", 16],
        ),
        Field(
            "maxConcurrentUnpacks",
            "max_concurrent_unpacks",
            Int(minimum=1, maximum=256, auto=True),
            "Parallel mode: layers unpacked at once on this node, all images together.",
        ),
        Field(
            "maxConcurrentUnpacksPerImage",
            "max_concurrent_unpacks_per_image",
            Int(minimum=1, maximum=64, auto=True),
            "Parallel mode: layers of one image unpacked at once.",
        ),
        Field(
            "discardUnpackedLayers",
            "discard_unpacked_layers",
            Bool(),
            "Parallel mode: drop a layer's compressed blob once it is unpacked (less disk; a Spegel "
            "mirror then has nothing to serve).",
        ),
        Field(
            "imagefsThroughputMBps",
            "imagefs_throughput_mbps",
            Int(minimum=0, maximum=100000),
            "Write throughput of the image filesystem in MB/s (e.g. an EBS volume's provisioned "
            "throughput), used to size unpacks; `0`: unknown, not a limit.",
        ),
        Field(
            "configFile",
            "config_file",
            Str(fmt.ABS_PATH),
            "The soci-snapshotter-grpc config file `nodeagent apply` writes.",
        ),
        Field(
            "address",
            "address",
            Str(fmt.ABS_PATH),
            "soci-snapshotter-grpc's socket (containerd's `proxy_plugins.soci.address`).",
        ),
        Field(
            "root",
            "root",
            Str(fmt.ABS_PATH),
            "soci-snapshotter-grpc's root directory, where its snapshots live (what eviction measures).",
        ),
        Field(
            "restartCommand",
            "restart_command",
            List(Str(), max_items=32),
            "Command (argv, no shell) `nodeagent apply` runs to restart soci-snapshotter-grpc after "
            "changing its config (generic flavor), before containerd is restarted. `[]` never restarts.",
        ),
    ],
    m.SociConfig,
    "The SOCI snapshotter (used when `snapshotter: soci`): pull mode and concurrency.",
)


def _build_containerd(**kwargs: Any) -> m.ContainerdConfig:
    entries = kwargs.pop("mirrors", ())
    kwargs["mirrors"] = tuple((name, e.mirrors) for name, e in entries)
    kwargs["mirror_only"] = frozenset(name for name, e in entries if e.mirror_only)
    return m.ContainerdConfig(**kwargs)


# for the schema's own tests: the model fields derived from other keys
_build_containerd.derived = frozenset({"mirror_only"})  # type: ignore[attr-defined]


CONTAINERD = Object(
    [
        Field(
            "maxConcurrentDownloads",
            "max_concurrent_downloads",
            Int(minimum=1, maximum=1000, auto=True),
            "containerd CRI `max_concurrent_downloads`: layers downloaded at once per pull. `auto` sizes "
            "it from this node's CPUs and NIC.",
            examples=["auto", 6],
        ),
        Field(
            "imagePullProgressTimeout",
            "image_pull_progress_timeout",
            Duration(),
            "containerd CRI `image_pull_progress_timeout`: cancel a pull that made no progress for this "
            "long; `0s` turns it off.",
        ),
        Field(
            "hostsDir",
            "hosts_dir",
            Str(fmt.ABS_PATH),
            "containerd registry `config_path`: where `<registry>/hosts.toml` files are written.",
        ),
        Field(
            "mirrors",
            "mirrors",
            Map(fmt.REGISTRY_HOST, REGISTRY_MIRRORS, max_items=256, key_identity=str.lower),
            "Registry host (or `_default` for all registries) to its ordered list of mirrors, or to "
            "`{mirrors: [...], mirrorOnly: true}`. Each becomes `<hostsDir>/<registry>/hosts.toml`; "
            "mirrors are tried in order, then the registry (never, with `mirrorOnly`).",
        ),
        Field("mirrorHealth", "mirror_health", MIRROR_HEALTH, MIRROR_HEALTH.description),
        Field(
            "restartCommand",
            "restart_command",
            List(Str(), max_items=32),
            "Command (argv, no shell) `nodeagent apply` runs to restart containerd after changing its "
            "config (generic flavor). If CRI Version does not answer afterwards, the previous config is "
            "restored and containerd restarted again. `[]` never restarts.",
        ),
        Field(
            "snapshotter",
            "snapshotter",
            Str(enum=("overlayfs", "soci")),
            "The snapshotter CRI pulls and runs images with: `overlayfs` (containerd's own) or `soci` "
            "(the SOCI snapshotter as a containerd proxy plugin; settings under `soci`).",
        ),
        Field("soci", "soci", SOCI, SOCI.description),
    ],
    m.ContainerdConfig,
    "containerd image settings and registry mirrors written by `nodeagent apply`.",
    build=_build_containerd,
)
