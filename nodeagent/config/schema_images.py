"""Schema of ``images:`` (prefetch, protect, registry credentials for prefetch), ``eviction:`` and
``podPulls:``. Part of ``nodeagent.config.schema``."""

from __future__ import annotations

from nodeagent.config import formats as fmt
from nodeagent.config import model as m
from nodeagent.config.objects import Field, Object
from nodeagent.config.types import Bool, Duration, Int, List, Str
from nodeagent.util import imageref

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
        ),
        Field(
            "required",
            "required",
            Bool(),
            "`nodeagent prefetch` fails (exit 1) when this image cannot be pulled.",
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
        ),
        Field(
            "protect",
            "protect",
            List(Str(fmt.GLOB), max_items=1000, unique=lambda p: p),
            "Glob patterns of image references nodeagent never evicts.",
            examples=[["public.ecr.aws/eks-distro/*"]],
        ),
        Field(
            "prefetchConcurrency",
            "prefetch_concurrency",
            Int(minimum=1, maximum=64),
            "Images `nodeagent prefetch` pulls at the same time.",
        ),
        Field(
            "prefetchBudget",
            "prefetch_budget",
            Duration(minimum=1.0, maximum=3600.0),
            "Total time `nodeagent prefetch` may take (it holds the kubelet back at boot); pulls still "
            "running then are canceled. systemd's TimeoutStartSec for nodeagent-prefetch.service is the "
            "backstop just above the default: raise both together.",
        ),
        Field(
            "credentialProviderConfig",
            "credential_provider_config",
            Str(fmt.ABS_PATH),
            "The kubelet's CredentialProviderConfig (`--image-credential-provider-config`); prefetch "
            "gets registry credentials from the same plugins the kubelet uses. A missing file means no "
            "plugins.",
        ),
        Field(
            "credentialProviderBinDir",
            "credential_provider_bin_dir",
            Str(fmt.ABS_PATH),
            "Directory of the credential provider plugins (`--image-credential-provider-bin-dir`).",
        ),
        Field(
            "dockerConfig",
            "docker_config",
            Str(fmt.ABS_PATH),
            "A docker `config.json` whose `auths` prefetch also uses (the kubelet reads the same file).",
        ),
        Field(
            "readyCondition",
            "ready_condition",
            Bool(),
            "`nodeagent run` reports the Node condition `nodeagent.io/ImagesReady` (True once every "
            "`required` prefetch image is present; it keeps pulling missing ones) with the node's own "
            "identity (`podPulls.kubeconfig`, `podPulls.nodeName`). The opt-in Karpenter startup taint's "
            "remover waits for it (docs/eks.md, 'Image readiness').",
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
        ),
        Field(
            "highThresholdPercent",
            "high_threshold_percent",
            Int(minimum=0, maximum=100),
            "Start removing unused images when the image filesystem is this full. Must be above "
            "`lowThresholdPercent`; keep it below `kubelet.imageGCHighThresholdPercent` so that "
            "nodeagent acts before the kubelet's image GC (`apply` warns otherwise).",
        ),
        Field(
            "lowThresholdPercent",
            "low_threshold_percent",
            Int(minimum=0, maximum=100),
            "Stop removing images once usage is down to this.",
        ),
        Field(
            "minUnusedAge",
            "min_unused_age",
            Duration(),
            "Never evict an image used more recently than this.",
        ),
        Field(
            "interval",
            "interval",
            Duration(minimum=1.0, maximum=3600.0),
            "How often the eviction loop checks disk usage (it also checks after every pull).",
        ),
        Field(
            "imagefsPath",
            "imagefs_path",
            Str(fmt.OPTIONAL_ABS_PATH),
            'A path on the image filesystem whose usage eviction measures (statvfs). `""`: with '
            "`containerd.snapshotter: soci` SOCI's `containerd.soci.root`, else the mountpoint the "
            "runtime reports in CRI ImageFsInfo (containerd: its snapshotter root).",
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
        ),
        Field(
            "kubeconfig",
            "kubeconfig",
            Str(fmt.ABS_PATH),
            "The kubeconfig whose identity reads pods and their pull secrets: the kubelet's own (the node "
            "authorizer allows a node exactly this; no RBAC to install).",
        ),
        Field(
            "nodeName",
            "node_name",
            Str(fmt.OPTIONAL_NODE_NAME),
            "This node's name in the cluster. `\"\"`: the kubeconfig identity's name "
            "(`system:node:NAME`, as the API server reports it).",
        ),
        Field(
            "concurrency",
            "concurrency",
            Int(minimum=1, maximum=64),
            "Image pulls nodeagent starts itself at once: pod pulls and `nodeagent prefetch` calls through "
            "the proxy share this limit (a pod's images are started before the next pod's); the kubelet's "
            "own pulls never wait for it.",
        ),
    ],
    m.PodPullsConfig,
    "Pod-aware pulls by the daemon (`nodeagent run`).",
)
