"""The eviction policy: which cached images to remove now, and why each one is kept or removed.

Pure: plain data in, a ``Plan`` out; no I/O, no clock (``now`` is an input). The loop and
``nodeagent evict --dry-run`` feed it what CRI, statvfs, the baked manifest and the last-used state
say.

Rules (DESIGN.md "Rules that hold everywhere", issue 5):

- Act only when the image filesystem is at or above the high threshold; then remove until the
  projected usage is at or below the low threshold, and stop there.
- Never an image used by any container or sandbox (running or not), pinned in the runtime, listed
  in the baked-images manifest, or matching ``images.protect``; never one used less than
  ``minUnusedAge`` ago.
- Least recently used first. An image's last use is the latest of the times recorded for its id,
  tags and digests; an image with no record at all sorts first (the loop records a first-seen time
  for every image it sees, so in the daemon that only happens when the state is lost). Ties go to
  the larger image, then the smaller id, so the plan is deterministic.
- If every candidate is removed and the projection is still above low, the plan says so
  (``low_unreachable``): what is left is protected, and the operator has to know.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, NamedTuple

from nodeagent.eviction.baked import BakedImage
from nodeagent.util import imageref as refs

KEEP: Final = "keep"
REMOVE: Final = "remove"
Verdict = Literal["keep", "remove"]

# Reasons, a closed set (also the label values of nodeagent_image_evictions_total{reason}).
IN_USE: Final = "in_use"
PINNED: Final = "pinned"
BAKED: Final = "baked"
PROTECTED: Final = "protected"
TOO_RECENT: Final = "too_recent"
NOT_NEEDED: Final = "not_needed"
LRU: Final = "lru"
KEEP_REASONS = (IN_USE, PINNED, BAKED, PROTECTED, TOO_RECENT, NOT_NEEDED)
REMOVE_REASONS = (LRU,)


@dataclass(frozen=True, slots=True)
class Image:
    """One image as CRI ListImages reports it."""

    id: str
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()
    size: int = 0
    pinned: bool = False

    @property
    def name(self) -> str:
        """How to show the image to a person: its first tag, else its first digest, else its id."""
        if self.repo_tags:
            return self.repo_tags[0]
        if self.repo_digests:
            return self.repo_digests[0]
        return self.id


@dataclass(frozen=True, slots=True)
class Container:
    """A container or pod sandbox and the image it was created from (ListContainers/ListPodSandbox).

    ``image`` is the ImageSpec as the runtime reports it (a reference or an id); ``image_ref`` and
    ``image_id`` what the runtime resolved it to (CRI ``image_ref``, and ``image_id`` since CRI v1.31).
    Any of them naming an image keeps it, whatever the container's state.
    """

    id: str
    image: str = ""
    image_ref: str = ""
    image_id: str = ""
    running: bool = False
    kind: Literal["container", "sandbox"] = "container"


@dataclass(frozen=True, slots=True)
class FsUsage:
    used_bytes: int
    total_bytes: int

    @property
    def ratio(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Thresholds:
    high_percent: int = 75
    low_percent: int = 65
    min_unused_age: float = 600.0

    def __post_init__(self) -> None:
        if not 0 <= self.low_percent <= self.high_percent <= 100:
            raise ValueError(
                f"thresholds: need 0 <= low ({self.low_percent}) <= high ({self.high_percent}) <= 100"
            )
        if self.min_unused_age < 0:
            raise ValueError("thresholds: minUnusedAge must not be negative")

    def high_bytes(self, total_bytes: int) -> int:
        return total_bytes * self.high_percent // 100

    def at_or_above_high(self, usage: FsUsage) -> bool:
        return usage.total_bytes > 0 and usage.used_bytes >= self.high_bytes(usage.total_bytes)


class Decision(NamedTuple):
    """The verdict on one image (a NamedTuple: plans build 10,000 of these quickly)."""

    image: Image
    verdict: Verdict
    reason: str
    last_used: float | None
    detail: str = ""  # which container, pattern or manifest entry made the decision


@dataclass(frozen=True, slots=True)
class Plan:
    usage: FsUsage
    thresholds: Thresholds
    high_bytes: int  # usage at which eviction starts
    low_bytes: int  # usage eviction aims for
    triggered: bool  # usage >= high
    removals: tuple[Decision, ...]  # in removal order (LRU first)
    decisions: tuple[Decision, ...]  # every image exactly once: removals first, then the rest in LRU order
    projected_used_bytes: int  # usage once every removal is done (from image sizes)
    low_unreachable: bool  # triggered, every candidate removed, still above low

    @property
    def removal_bytes(self) -> int:
        return sum(d.image.size for d in self.removals)

    def kept(self, reason: str) -> list[Decision]:
        return [d for d in self.decisions if d.verdict == KEEP and d.reason == reason]


class ProtectMatcher:
    """``images.protect`` globs, compiled once into one regex.

    A pattern matches an image's id, one of its tags or digest references, or a repository name
    (tag and digest stripped): ``docker.io/library/busybox`` protects every busybox tag. Short names
    are normalized like references (``busybox*`` -> ``docker.io/library/busybox*``); ``*`` and ``?``
    match any character including ``/``; ``[...]`` and ``[!...]`` are character classes (fnmatch).
    """

    def __init__(self, patterns: Iterable[str]) -> None:
        self.patterns = tuple(p for p in (x.strip() for x in patterns) if p)
        bodies = [_glob_body(refs.normalize_pattern(p)) for p in self.patterns]
        # A pattern must match a whole id, tag or digest reference, optionally followed by a ":tag"
        # or "@digest" that it left out (then it named the repository).
        tail = r"(?:[:@][^/]*)?"
        self._any = re.compile(f"(?:{'|'.join(bodies)}){tail}", re.S) if bodies else None
        self._each = [
            (re.compile(f"(?:{b}){tail}", re.S), p) for b, p in zip(bodies, self.patterns, strict=True)
        ]

    def match(self, image: Image) -> str | None:
        """The first pattern that protects ``image`` (as the operator wrote it), or None."""
        if self._any is None:
            return None
        fullmatch = self._any.fullmatch
        for text in (image.id, *image.repo_tags, *image.repo_digests):
            if fullmatch(text) is not None:
                return next(p for rx, p in self._each if rx.fullmatch(text))
        return None


def _glob_body(pattern: str) -> str:
    """fnmatch's glob syntax as a regex body (compiled with re.S: ``*`` matches anything)."""
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        i += 1
        if c == "*":
            out.append(".*")
        elif c == "?":
            out.append(".")
        elif c == "[":
            j = i
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                out.append(re.escape(c))
                continue
            body = pattern[i:j].replace("\\", "\\\\")
            i = j + 1
            if body.startswith("!"):
                out.append(f"[^{body[1:]}]")
            elif body.startswith("^"):
                out.append(f"[\\{body}]")
            else:
                out.append(f"[{body}]")
        else:
            out.append(re.escape(c))
    return "".join(out)


def _in_use_keys(containers: Iterable[Container], extra: Iterable[str]) -> dict[str, str]:
    """Every id/reference in use -> a short description of one user (for the decision detail)."""
    keys: dict[str, str] = {}
    for c in containers:
        who = f"{c.kind} {c.id[:13]}" + (" (running)" if c.running else "")
        for s in (c.image_id, c.image_ref, c.image):
            if s:
                keys.setdefault(s, who)
                keys.setdefault(refs.normalize(s), who)
    for s in extra:
        if s:
            keys.setdefault(refs.normalize(s), "sandbox image of the runtime")
    return keys


class InUse:
    """The images containers and sandboxes use, indexed once; ``user(image)`` says who uses it."""

    def __init__(self, containers: Iterable[Container], in_use_refs: Iterable[str] = ()) -> None:
        self.keys = _in_use_keys(containers, in_use_refs)

    def user(self, image: Image) -> str | None:
        keys = self.keys
        for k in (image.id, *image.repo_tags, *image.repo_digests):
            user = keys.get(k)
            if user is not None:
                return user
        return None


def in_use_by(image: Image, containers: Iterable[Container], in_use_refs: Iterable[str] = ()) -> str | None:
    """Who uses ``image`` now (a short description), or None: the check right before a removal."""
    return InUse(containers, in_use_refs).user(image)


def _baked_keys(baked: Iterable[BakedImage]) -> dict[str, str]:
    keys: dict[str, str] = {}
    for b in baked:
        keys.setdefault(b.digest, b.reference)
        keys.setdefault(refs.normalize(b.reference), b.reference)
    return keys


def last_used_of(image: Image, last_used: Mapping[str, float]) -> float | None:
    """The latest recorded use of any of the image's id, tags and digests."""
    best: float | None = last_used.get(image.id)
    for k in image.repo_tags:
        t = last_used.get(k)
        if t is not None and (best is None or t > best):
            best = t
    for k in image.repo_digests:
        t = last_used.get(k)
        if t is not None and (best is None or t > best):
            best = t
    return best


def _lookup(
    get: Callable[[str], str | None],
    iid: str,
    tags: Sequence[str],
    digests: Sequence[str],
    *,
    bare_digests: bool = False,
) -> str | None:
    """``get`` of the image's id, else of its first tag that has a value, else of its first repo
    digest (``name@sha256:...``; with ``bare_digests`` also the bare ``sha256:...``)."""
    found = get(iid)
    if found is None:
        for k in tags:
            if (found := get(k)) is not None:
                return found
        for k in digests:
            found = get(k)
            if found is None and bare_digests:
                found = get(k.rpartition("@")[2])
            if found is not None:
                return found
    return found


def plan(
    images: Sequence[Image],
    containers: Iterable[Container],
    *,
    usage: FsUsage,
    thresholds: Thresholds,
    now: float,
    last_used: Mapping[str, float],
    protect: ProtectMatcher | Iterable[str] = (),
    baked: Iterable[BakedImage] = (),
    in_use_refs: Iterable[str] = (),
    continuing: bool = False,
) -> Plan:
    """Decide, for every image, whether to remove it now (and in which order) or keep it, and why.

    ``in_use_refs``: images in use that no container lists, e.g. the runtime's sandbox image.
    ``continuing``: an eviction that started at or above high is still under way, so go on down to
    low even though usage is now below high (hysteresis within one eviction cycle).
    """
    # This runs over every image on the node on every pull; it is written for speed (10,000 images
    # well under 50 ms, bench/bench_eviction.py): local names, no per-image function calls.
    matcher = protect if isinstance(protect, ProtectMatcher) else ProtectMatcher(protect)
    match_protect = matcher.match if matcher.patterns else None
    in_use = _in_use_keys(containers, in_use_refs)
    use_get = in_use.get
    baked_keys = _baked_keys(baked)
    baked_get = baked_keys.get
    lu_get = last_used.get
    min_age = thresholds.min_unused_age
    neg_inf = float("-inf")

    kept: list[tuple[float, str, Decision]] = []
    candidates: list[tuple[float, int, str, Image, float | None]] = []
    for img in images:
        iid, tags, digests = img.id, img.repo_tags, img.repo_digests
        lu = lu_get(iid)
        for k in tags:
            t = lu_get(k)
            if t is not None and (lu is None or t > lu):
                lu = t
        for k in digests:
            t = lu_get(k)
            if t is not None and (lu is None or t > lu):
                lu = t
        order = neg_inf if lu is None else lu

        if in_use:
            user = _lookup(use_get, iid, tags, digests)
            if user is not None:
                kept.append((order, iid, Decision(img, KEEP, IN_USE, lu, user)))
                continue
        if img.pinned:
            kept.append((order, iid, Decision(img, KEEP, PINNED, lu, "pinned in the runtime")))
            continue
        if baked_keys:
            entry = _lookup(baked_get, iid, tags, digests, bare_digests=True)
            if entry is not None:
                kept.append((order, iid, Decision(img, KEEP, BAKED, lu, entry)))
                continue
        if match_protect is not None:
            pattern = match_protect(img)
            if pattern is not None:
                kept.append((order, iid, Decision(img, KEEP, PROTECTED, lu, pattern)))
                continue
        if lu is not None and now - lu < min_age:
            ago = f"used {max(0.0, now - lu):.0f}s ago"
            kept.append((order, iid, Decision(img, KEEP, TOO_RECENT, lu, ago)))
            continue
        candidates.append((order, -img.size, iid, img, lu))

    candidates.sort(key=_candidate_key)
    total = usage.total_bytes
    low_bytes = total * thresholds.low_percent // 100
    triggered = thresholds.at_or_above_high(usage) or (
        continuing and total > 0 and usage.used_bytes > low_bytes
    )
    projected = usage.used_bytes
    removals: list[Decision] = []
    n = 0
    if triggered:
        for _, _, _, img, lu in candidates:
            if projected <= low_bytes:
                break
            removals.append(Decision(img, REMOVE, LRU, lu))
            projected -= img.size
        n = len(removals)
    rest = [Decision(img, KEEP, NOT_NEEDED, lu) for _, _, _, img, lu in candidates[n:]]
    kept.sort(key=_kept_key)
    return Plan(
        usage=usage,
        thresholds=thresholds,
        high_bytes=thresholds.high_bytes(total),
        low_bytes=low_bytes,
        triggered=triggered,
        removals=tuple(removals),
        decisions=(*removals, *rest, *(d for _, _, d in kept)),
        projected_used_bytes=max(0, projected),
        low_unreachable=triggered and projected > low_bytes,
    )


def _candidate_key(c: tuple[float, int, str, Image, float | None]) -> tuple[float, int, str]:
    return c[0], c[1], c[2]


def _kept_key(k: tuple[float, str, Decision]) -> tuple[float, str]:
    return k[0], k[1]
