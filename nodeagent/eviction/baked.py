"""The baked-images manifest (``Paths.baked_manifest``), written by ``nodeagent prefetch --bake``.

A JSON list of ``{"reference", "digest", "size", "pinned"}`` objects, one per image baked into the
node image. Eviction never removes these images; ``nodeagent status`` shows them. This module is the
one reader (and writer, so both sides agree on the format).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nodeagent.util.atomicio import write_atomic

MAX_ENTRIES = 10_000  # a manifest is written by our own bake step; anything larger is not ours


class BakedManifestError(ValueError):
    """The manifest exists but cannot be used; the message names the file and the entry."""


@dataclass(frozen=True, slots=True)
class BakedImage:
    reference: str  # as the bake step pulled it, e.g. public.ecr.aws/eks-distro/kubernetes/pause:3.10
    digest: str  # the image's manifest digest (sha256:...), the one in RepoDigests
    size: int = 0
    pinned: bool = False

    def to_json(self) -> dict[str, object]:
        return {"reference": self.reference, "digest": self.digest, "size": self.size, "pinned": self.pinned}


def parse(text: str, source: str = "<baked-images>") -> tuple[BakedImage, ...]:
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise BakedManifestError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(doc, list):
        raise BakedManifestError(f"{source}: expected a JSON list of images, got {type(doc).__name__}")
    if len(doc) > MAX_ENTRIES:
        raise BakedManifestError(f"{source}: {len(doc)} entries, more than {MAX_ENTRIES}")
    out: list[BakedImage] = []
    for i, item in enumerate(doc):
        where = f"{source}: [{i}]"
        if not isinstance(item, dict):
            raise BakedManifestError(f"{where}: expected an object")
        ref, digest = item.get("reference"), item.get("digest")
        size, pinned = item.get("size", 0), item.get("pinned", False)
        if not isinstance(ref, str) or not ref:
            raise BakedManifestError(f"{where}.reference: expected a non-empty string")
        if not isinstance(digest, str) or not digest.startswith("sha256:"):
            raise BakedManifestError(f"{where}.digest: expected 'sha256:...'")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BakedManifestError(f"{where}.size: expected a non-negative integer")
        if not isinstance(pinned, bool):
            raise BakedManifestError(f"{where}.pinned: expected true or false")
        out.append(BakedImage(ref, digest, size, pinned))
    return tuple(out)


def load(path: Path) -> tuple[BakedImage, ...]:
    """The manifest's entries; none when the file does not exist (a node image without baked images)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return ()
    except OSError as e:
        raise BakedManifestError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def dump(images: Iterable[BakedImage]) -> str:
    return json.dumps([b.to_json() for b in images], indent=2) + "\n"


def write(path: Path, images: Iterable[BakedImage]) -> bool:
    """Write the manifest atomically (mode 0644: it holds no secrets). True if it changed."""
    return write_atomic(path, dump(images), mode=0o644)
