"""The validated configuration, as typed, frozen objects.

``nodeagent.config.load()`` is the way to get one from a file: it validates the YAML against the
schema in ``nodeagent.config.schema`` (keys, types, ranges, rules) and builds these objects. The
defaults below are the only place defaults are declared: the schema reads them from here.
Durations are seconds (float). ``AUTO`` marks a value nodeagent sizes itself
from node facts (see docs/tuning.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

API_VERSION = "nodeagent.io/v1alpha1"  # the document's apiVersion and kind (checked, not kept)
KIND = "NodeAgentConfig"

Auto = Literal["auto"]
AUTO: Auto = "auto"


@dataclass(frozen=True)
class CriConfig:
    endpoint: str = "unix:///run/containerd/containerd.sock"
    proxy_socket: str = "/run/nodeagent/cri.sock"  # "" turns the proxy off
    proxy_max_connections: int = 32  # client connections the proxy keeps at once
    timeout: float = 10.0  # deadline for short CRI calls (pulls have their own)


@dataclass(frozen=True)
class KubeletConfig:
    serialize_image_pulls: bool = False
    max_parallel_image_pulls: int | Auto = AUTO
    registry_pull_qps: int = 10
    registry_burst: int = 20
    image_gc_high_threshold_percent: int = 85
    image_gc_low_threshold_percent: int = 80
    image_minimum_gc_age: float = 120.0
    image_maximum_gc_age: float = 0.0


CredentialsFrom = Literal["provider", "dockerConfig", "file"]


@dataclass(frozen=True)
class MirrorCredentials:
    """``containerd.mirrors.<registry>[i].credentials``: where the mirror's credentials come from.

    nodeagent turns them into an ``Authorization`` header of that mirror's ``[host]`` section only
    (``nodeagent.mirrorcreds``), refreshed by the daemon before they expire.
    """

    source: CredentialsFrom  # "from" in YAML
    image: str | None = None  # what the provider / docker config is asked for; None: the mirror's host/path
    path: str | None = None  # dockerConfig: the config.json (None: images.dockerConfig); file: required


@dataclass(frozen=True)
class Mirror:
    endpoint: str
    capabilities: tuple[str, ...] = ("pull", "resolve")
    skip_verify: bool = False
    ca: tuple[str, ...] = ()
    override_path: bool = False
    header: tuple[tuple[str, tuple[str, ...]], ...] = ()
    dial_timeout: float | None = None
    credentials: MirrorCredentials | None = None


@dataclass(frozen=True)
class RegistryMirrors:
    """The long form of one ``containerd.mirrors`` entry: ``{mirrors: [...], mirrorOnly: true}``."""

    mirrors: tuple[Mirror, ...] = ()
    mirror_only: bool = False


@dataclass(frozen=True)
class MirrorHealthConfig:
    """``containerd.mirrorHealth``: probe mirrors and take a dead one out of hosts.toml (issue 8).

    Defaults are sized so that a mirror that hangs costs a pull under 10 s: three failed probes
    2 s apart, each bounded by 1 s, take it out (about 5-7 s); it returns after 5 good probes, and
    at most one hosts.toml rewrite per mirror happens per ``hold_time``.
    """

    enabled: bool = True
    interval: float = 2.0
    timeout: float = 1.0
    failures_before_down: int = 3
    successes_before_up: int = 5
    hold_time: float = 60.0


@dataclass(frozen=True)
class SociConfig:
    """``containerd.soci``: the SOCI snapshotter's pull mode and its concurrency (issue 16).

    ``auto`` values are sized from node facts (docs/tuning.md, "SOCI snapshotter").
    """

    pull_mode: str = "parallel"  # parallel | lazy | off
    max_concurrent_downloads: int | Auto = AUTO  # all images together
    max_concurrent_downloads_per_image: int | Auto = AUTO
    chunk_size_mib: int | Auto = AUTO
    max_concurrent_unpacks: int | Auto = AUTO  # all images together
    max_concurrent_unpacks_per_image: int | Auto = AUTO
    discard_unpacked_layers: bool = True
    imagefs_throughput_mbps: int = 0  # write throughput of the image filesystem, MB/s; 0: unknown
    config_file: str = "/etc/soci-snapshotter-grpc/config.toml"
    address: str = "/run/soci-snapshotter-grpc/soci-snapshotter-grpc.sock"
    root: str = "/var/lib/soci-snapshotter-grpc"
    restart_command: tuple[str, ...] = ("systemctl", "restart", "soci-snapshotter")


@dataclass(frozen=True)
class ContainerdConfig:
    max_concurrent_downloads: int | Auto = AUTO
    image_pull_progress_timeout: float = 300.0
    hosts_dir: str = "/etc/containerd/certs.d"
    # registry host (or "_default") -> ordered mirrors; order of registries as written
    mirrors: tuple[tuple[str, tuple[Mirror, ...]], ...] = ()
    mirror_health: MirrorHealthConfig = field(default_factory=MirrorHealthConfig)
    # registries written without `server = <upstream>`: pulls never leave their mirrors
    mirror_only: frozenset[str] = frozenset()
    # generic flavor: how `nodeagent apply` restarts containerd after changing its config (argv, no shell)
    restart_command: tuple[str, ...] = ("systemctl", "restart", "containerd")
    snapshotter: str = "overlayfs"  # overlayfs | soci
    soci: SociConfig = field(default_factory=SociConfig)

    def mirrors_of(self, registry: str) -> tuple[Mirror, ...]:
        for name, mirrors in self.mirrors:
            if name == registry:
                return mirrors
        return ()

    def is_mirror_only(self, registry: str) -> bool:
        return registry in self.mirror_only


@dataclass(frozen=True)
class PrefetchImage:
    image: str
    pin: bool = False
    required: bool = False


@dataclass(frozen=True)
class ImagesConfig:
    prefetch: tuple[PrefetchImage, ...] = ()
    protect: tuple[str, ...] = ()
    # `nodeagent prefetch`: parallel pulls, and the total time it may hold the kubelet back
    # (systemd/nodeagent-prefetch.service's TimeoutStartSec sits just above this default).
    prefetch_concurrency: int = 4
    prefetch_budget: float = 300.0
    # Registry credentials without new secrets: the kubelet's image credential provider plugins
    # (AL2023 defaults, as nodeadm passes them to the kubelet) and a docker config.json.
    credential_provider_config: str = "/etc/eks/image-credential-provider/config.json"
    credential_provider_bin_dir: str = "/etc/eks/image-credential-provider"
    docker_config: str = "/var/lib/kubelet/config.json"
    # `nodeagent run` reports the Node condition nodeagent.io/ImagesReady (nodeagent/images/readiness.py)
    ready_condition: bool = True


@dataclass(frozen=True)
class EvictionConfig:
    enabled: bool = True
    high_threshold_percent: int = 75
    low_threshold_percent: int = 65
    min_unused_age: float = 600.0
    interval: float = 30.0
    imagefs_path: str = ""  # "" = CRI ImageFsInfo's mountpoint


@dataclass(frozen=True)
class PodPullsConfig:
    """``podPulls``: pull every image of a pod bound to this node at once (nodeagent/podpulls)."""

    enabled: bool = True
    kubeconfig: str = "/var/lib/kubelet/kubeconfig"
    node_name: str = ""  # "" = the kubeconfig identity's name (system:node:NAME)
    concurrency: int = 4


@dataclass(frozen=True)
class MetricsConfig:
    listen: str = "0.0.0.0:9847"
    per_image_series_limit: int = 100


@dataclass(frozen=True)
class Config:
    cri: CriConfig = field(default_factory=CriConfig)
    kubelet: KubeletConfig = field(default_factory=KubeletConfig)
    containerd: ContainerdConfig = field(default_factory=ContainerdConfig)
    images: ImagesConfig = field(default_factory=ImagesConfig)
    eviction: EvictionConfig = field(default_factory=EvictionConfig)
    pod_pulls: PodPullsConfig = field(default_factory=PodPullsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
