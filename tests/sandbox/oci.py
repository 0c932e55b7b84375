"""Build container images in code and push them with the registry HTTP API.

    img = build_image(layers=3, layer_size=2 << 20)              # 3 layers of incompressible bytes
    pushed = push_image(registry, "team/app", "v1", img)        # -> PushedImage
    pushed.reference      "127.0.0.1:PORT/team/app:v1"
    pushed.image_id       config digest, which is what CRI reports as Image.id
    pushed.size           manifest + config + compressed layers (what containerd's CRI reports as size)

``busybox=True`` adds a first layer holding the static ``/bin/busybox`` (package busybox-static) and
sets the entrypoint (default ``/bin/busybox sleep 3600``), so the image can run as a container or
serve as the pod sandbox ("pause") image. Layers are gzip tars of random bytes, so what lands on
disk is predictable: about compressed size in the content store plus the same again unpacked.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import platform
import random
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.sandbox.process import SandboxError

BUSYBOX = Path("/bin/busybox")
DEFAULT_ENTRYPOINT = ("/bin/busybox", "sleep", "3600")

MEDIA = {
    "docker": {
        "manifest": "application/vnd.docker.distribution.manifest.v2+json",
        "config": "application/vnd.docker.container.image.v1+json",
        "layer": "application/vnd.docker.image.rootfs.diff.tar.gzip",
    },
    "oci": {
        "manifest": "application/vnd.oci.image.manifest.v1+json",
        "config": "application/vnd.oci.image.config.v1+json",
        "layer": "application/vnd.oci.image.layer.v1.tar+gzip",
    },
}


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def go_arch() -> str:
    m = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm"}.get(m, m)


@dataclass(frozen=True)
class Blob:
    media_type: str
    data: bytes
    diff_id: str = ""  # layers only: digest of the uncompressed tar

    @property
    def digest(self) -> str:
        return sha256_digest(self.data)

    @property
    def size(self) -> int:
        return len(self.data)

    def descriptor(self) -> dict[str, object]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    config: Blob
    layers: tuple[Blob, ...]
    manifest: bytes
    manifest_media_type: str

    @property
    def manifest_digest(self) -> str:
        return sha256_digest(self.manifest)

    @property
    def image_id(self) -> str:
        return self.config.digest

    @property
    def layers_size(self) -> int:
        return sum(b.size for b in self.layers)

    @property
    def size(self) -> int:
        return len(self.manifest) + self.config.size + self.layers_size


@dataclass(frozen=True)
class PushedImage:
    registry: str  # host:port
    repository: str
    tag: str
    image: Image = field(repr=False)

    @property
    def reference(self) -> str:
        return f"{self.registry}/{self.repository}:{self.tag}"

    @property
    def digest_reference(self) -> str:
        return f"{self.registry}/{self.repository}@{self.manifest_digest}"

    @property
    def manifest_digest(self) -> str:
        return self.image.manifest_digest

    @property
    def image_id(self) -> str:
        return self.image.image_id

    @property
    def layer_digests(self) -> list[str]:
        return [b.digest for b in self.image.layers]

    @property
    def size(self) -> int:
        return self.image.size


def _tar_layer(files: Sequence[tuple[tarfile.TarInfo, bytes | None]], media_type: str) -> Blob:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in files:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    tar_bytes = raw.getvalue()
    gz = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return Blob(media_type, gz, diff_id=sha256_digest(tar_bytes))


def _file(name: str, data: bytes, mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = mode
    return info, data


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    return info, None


def random_layer(size: int, rng: random.Random, media_type: str, index: int = 0) -> Blob:
    """A layer holding one file of ``size`` random (incompressible) bytes."""
    step = 64 << 20  # randbytes takes at most 256 MiB at once; 64 MiB pieces (same bytes below that)
    data = b"".join(rng.randbytes(min(step, size - i)) for i in range(0, size, step)) if size else b""
    return _tar_layer([_dir("data"), _file(f"data/blob-{index}.bin", data)], media_type)


def busybox_layer(media_type: str) -> Blob:
    try:
        data = BUSYBOX.read_bytes()
    except FileNotFoundError:
        raise SandboxError(f"{BUSYBOX}: missing (apt-get install busybox-static)") from None
    sh = tarfile.TarInfo("bin/sh")
    sh.type = tarfile.SYMTYPE
    sh.linkname = "busybox"
    return _tar_layer([_dir("bin"), _file("bin/busybox", data, 0o755), (sh, None), _dir("tmp")], media_type)


def build_image(
    layers: int = 1,
    layer_size: int = 1 << 20,
    *,
    seed: int | str | None = None,
    busybox: bool = False,
    entrypoint: Sequence[str] | None = None,
    labels: Mapping[str, str] | None = None,
    media: str = "docker",
) -> Image:
    """An image of ``layers`` random layers of ``layer_size`` bytes each (plus busybox if asked)."""
    if media not in MEDIA:
        raise ValueError(f"media must be one of {sorted(MEDIA)}")
    mt = MEDIA[media]
    rng = random.Random(seed) if seed is not None else random.Random()
    blobs: list[Blob] = []
    if busybox:
        blobs.append(busybox_layer(mt["layer"]))
    blobs += [random_layer(layer_size, rng, mt["layer"], i) for i in range(layers)]
    if not blobs:
        raise ValueError("an image needs at least one layer")
    cfg: dict[str, object] = {"Env": ["PATH=/bin"]}
    if busybox or entrypoint:
        cfg["Entrypoint"] = list(entrypoint or DEFAULT_ENTRYPOINT)
    if labels:
        cfg["Labels"] = dict(labels)
    config = {
        "architecture": go_arch(),
        "os": "linux",
        "created": "2024-01-01T00:00:00Z",
        "config": cfg,
        "rootfs": {"type": "layers", "diff_ids": [b.diff_id for b in blobs]},
        "history": [{"created": "2024-01-01T00:00:00Z", "created_by": "nodeagent tests"} for _ in blobs],
    }
    config_blob = Blob(mt["config"], json.dumps(config, sort_keys=True).encode())
    manifest = {
        "schemaVersion": 2,
        "mediaType": mt["manifest"],
        "config": config_blob.descriptor(),
        "layers": [b.descriptor() for b in blobs],
    }
    return Image(config_blob, tuple(blobs), json.dumps(manifest, indent=2).encode(), mt["manifest"])


class _Http:
    def __init__(self, base: str, authorization: str | None) -> None:
        self.base = base.rstrip("/")
        self.authorization = authorization

    def request(
        self, method: str, url: str, data: bytes | None = None, headers: Mapping[str, str] | None = None
    ) -> tuple[int, Mapping[str, str], bytes]:
        if not url.startswith("http"):
            url = self.base + url
        req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
        if self.authorization:
            req.add_header("Authorization", self.authorization)
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()


def push_image(
    registry: object,
    repository: str,
    tag: str,
    image: Image,
    *,
    auth: tuple[str, str] | None = None,
) -> PushedImage:
    """Push ``image`` as ``repository:tag`` to ``registry`` (a Registry, or "host:port").

    Uses the registry API directly: HEAD each blob, monolithic upload (POST then PUT ?digest=) for
    missing ones, then PUT the manifest. Credentials default to the Registry's own.
    """
    import base64

    host = getattr(registry, "host", registry)
    if not isinstance(host, str):
        raise TypeError("registry must be a Registry or 'host:port'")
    if auth is None:
        auth = getattr(registry, "auth", None)
    authz = "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode() if auth else None
    http = _Http(f"http://{host}", authz)
    name = repository
    for blob in (image.config, *image.layers):
        status, _, _ = http.request("HEAD", f"/v2/{name}/blobs/{blob.digest}")
        if status == 200:
            continue
        status, headers, body = http.request("POST", f"/v2/{name}/blobs/uploads/")
        if status != 202:
            raise SandboxError(f"push {host}/{name}: start upload: HTTP {status} {body[:200]!r}")
        location = headers.get("Location") or headers.get("location") or ""
        if location.startswith("/"):
            location = f"http://{host}{location}"
        sep = "&" if "?" in location else "?"
        url = f"{location}{sep}digest={urllib.parse.quote(blob.digest)}"
        status, _, body = http.request(
            "PUT",
            url,
            blob.data,
            {"Content-Type": "application/octet-stream", "Content-Length": str(blob.size)},
        )
        if status != 201:
            raise SandboxError(f"push {host}/{name}: blob {blob.digest}: HTTP {status} {body[:200]!r}")
    status, _, body = http.request(
        "PUT", f"/v2/{name}/manifests/{tag}", image.manifest, {"Content-Type": image.manifest_media_type}
    )
    if status != 201:
        raise SandboxError(f"push {host}/{name}:{tag}: manifest: HTTP {status} {body[:200]!r}")
    return PushedImage(host, repository, tag, image)


def make_image(registry: object, repository: str, tag: str = "v1", **build: object) -> PushedImage:
    """``build_image(**build)`` then ``push_image`` in one call."""
    return push_image(registry, repository, tag, build_image(**build))  # type: ignore[arg-type]


def push_many(registry: object, repository: str, count: int, threads: int = 16) -> list[PushedImage]:
    """``count`` distinct small images as ``repository:t0..t<count-1>`` (own config each, one shared
    256-byte layer): a long image list at little cost."""
    from concurrent.futures import ThreadPoolExecutor

    images = [build_image(layers=1, layer_size=256, seed=1, labels={"n": str(i)}) for i in range(count)]
    push_image(registry, repository, "t0", images[0])  # the shared layer once
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(lambda i: push_image(registry, repository, f"t{i}", images[i]), range(count)))


def write_oci_layout(image: Image, directory: Path, tag: str = "v1") -> Path:
    """``image`` as an OCI image layout directory (``oci-layout``, ``index.json``, ``blobs/sha256/``),
    the input of ``soci convert --standalone`` and skopeo's ``oci:`` transport."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    for data in (image.config.data, *(b.data for b in image.layers), image.manifest):
        (blobs / sha256_digest(data).removeprefix("sha256:")).write_bytes(data)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    entry = {
        "mediaType": image.manifest_media_type,
        "digest": image.manifest_digest,
        "size": len(image.manifest),
        "annotations": {"org.opencontainers.image.ref.name": tag},
    }
    (directory / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [entry]}))
    return directory
