"""What an eviction plan is made from, read one way for the daemon's loop and ``evict --dry-run``.

``gather()`` measures the image filesystem (``usage.Imagefs``: located once, statvfs now), then
lists the images and their users (containers and sandboxes) through CRI; ``BakedManifest`` reads
the baked-images manifest again only when the file changed; ``record_use`` gives the last-used
state what the loop saw. A failure names its stage (``StageError``: ``usage``, ``list`` or
``manifest``), which is what the loop counts in ``nodeagent_image_eviction_errors_total{stage}``
and what ``evict`` prints.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nodeagent.cri.runtime import Runtime
from nodeagent.eviction import baked
from nodeagent.eviction.inventory import Inventory
from nodeagent.eviction.policy import Container, FsUsage, Image, InUse, last_used_of
from nodeagent.eviction.usage import Imagefs
from nodeagent.images.lastused import LastUsed


class StageError(Exception):
    """A step of eviction failed; ``stage`` is one of ``metrics.EVICTION_ERROR_STAGES``."""

    def __init__(self, stage: str, error: BaseException | str) -> None:
        self.stage = stage
        super().__init__(str(error))


@dataclass(frozen=True)
class Inputs:
    imagefs: Path  # the filesystem measured
    usage: FsUsage
    images: list[Image]
    users: list[Container]  # containers and sandboxes, with the image each uses


async def measure(cri: Runtime, imagefs: Imagefs) -> FsUsage:
    """The image filesystem's usage now. Raises ``StageError("usage")``."""
    try:
        return await imagefs.measure(cri)
    except Exception as e:  # UsageError, or ImageFsInfo failed
        raise StageError("usage", e) from None


async def users(inventory: Inventory) -> list[Container]:
    """Containers and sandboxes now (read again right before each removal). Raises
    ``StageError("list")``."""
    try:
        return await inventory.users()
    except Exception as e:
        raise StageError("list", e) from None


async def gather(cri: Runtime, imagefs: Imagefs, inventory: Inventory | None = None) -> Inputs:
    """Measure, then list images and their users. Raises ``StageError``."""
    fs = await measure(cri, imagefs)
    inv = inventory or Inventory(cri)
    try:
        images = await inv.images()
    except Exception as e:
        raise StageError("list", e) from None
    found = await users(inv)
    assert imagefs.path is not None  # measured above
    return Inputs(imagefs.path, fs, images, found)


class BakedManifest:
    """The baked-images manifest, read again only when its mtime or size changed. A broken
    manifest stops eviction (``StageError("manifest")``): removing a baked image cannot be undone
    offline. A missing one means no baked images."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int] | None = None
        self._images: tuple[baked.BakedImage, ...] = ()

    def load(self) -> tuple[baked.BakedImage, ...]:
        try:
            st = self.path.stat()
            key: tuple[int, int] | None = (st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            key = None
        except OSError as e:
            raise StageError("manifest", f"{self.path}: {e.strerror}") from None
        if key != self._key or key is None:
            try:
                self._images = baked.load(self.path)
            except baked.BakedManifestError as e:
                self._key = None
                raise StageError("manifest", e) from None
            self._key = key
        return self._images


def record_use(last_used: LastUsed, inputs: Inputs, now: float, in_use_refresh: float) -> None:
    """An image seen for the first time gets "now" (``minUnusedAge`` counts from there), and an
    image in use gets "now" again at most every ``in_use_refresh`` seconds, so eviction's age is
    the time since an image was last needed, as in the kubelet's image GC."""
    times = last_used.items()
    for img in inputs.images:
        if last_used_of(img, times) is None:
            last_used.touch(img.id, now)
    if not inputs.users:
        return
    in_use = InUse(inputs.users)
    for img in inputs.images:
        if in_use.user(img) is not None:
            t = last_used.get(img.id)
            if t is None or now - t >= in_use_refresh:
                last_used.touch(img.id, now)
