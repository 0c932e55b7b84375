import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.eviction.baked import BakedImage
from nodeagent.eviction.policy import (
    BAKED,
    IN_USE,
    KEEP,
    LRU,
    NOT_NEEDED,
    PINNED,
    PROTECTED,
    REMOVE,
    TOO_RECENT,
    Container,
    FsUsage,
    Image,
    Plan,
    ProtectMatcher,
    Thresholds,
    plan,
)

MB = 1_000_000
NOW = 1_000_000.0
T = Thresholds(high_percent=60, low_percent=40, min_unused_age=600)


def sha(n: int) -> str:
    return f"sha256:{n:064x}"


def img(n: int, size_mb: int = 10, *, tag: str | None = None, pinned: bool = False) -> Image:
    t = tag if tag is not None else f"reg.example:5000/app{n}:v1"
    digest = f"{t.rsplit(':', 1)[0]}@{sha(10_000 + n)}"
    return Image(id=sha(n), repo_tags=(t,), repo_digests=(digest,), size=size_mb * MB, pinned=pinned)


def usage(used_mb: int, total_mb: int = 200) -> FsUsage:
    return FsUsage(used_mb * MB, total_mb * MB)


def ids(decisions: object) -> list[str]:
    return [d.image.id for d in decisions]  # type: ignore[attr-defined]


def by_id(p: Plan) -> dict[str, tuple[str, str]]:
    return {d.image.id: (d.verdict, d.reason) for d in p.decisions}


def test_below_high_removes_nothing_and_says_not_needed() -> None:
    images = [img(i) for i in range(5)]
    p = plan(images, [], usage=usage(119), thresholds=T, now=NOW, last_used={})
    assert not p.triggered
    assert p.removals == ()
    assert {r for _, r in by_id(p).values()} == {NOT_NEEDED}
    assert not p.low_unreachable


def test_at_high_removes_lru_first_and_stops_at_low() -> None:
    # 200 MB fs, 120 MB used (60%): must get to <= 80 MB, i.e. free 40 MB = four 10 MB images.
    images = [img(i) for i in range(8)]
    last_used = {sha(i): NOW - 10_000 + i * 100 for i in range(8)}  # image 0 is the least recent
    p = plan(images, [], usage=usage(120), thresholds=T, now=NOW, last_used=last_used)
    assert p.triggered
    assert ids(p.removals) == [sha(0), sha(1), sha(2), sha(3)]
    assert all(d.verdict == REMOVE and d.reason == LRU for d in p.removals)
    assert p.projected_used_bytes == 80 * MB
    assert [by_id(p)[sha(i)] for i in range(4, 8)] == [(KEEP, NOT_NEEDED)] * 4
    assert not p.low_unreachable


def test_stops_as_soon_as_projection_reaches_low() -> None:
    images = [img(0, 50), img(1, 10), img(2, 10)]
    last_used = {sha(0): 1.0, sha(1): 2.0, sha(2): 3.0}
    p = plan(images, [], usage=usage(125), thresholds=T, now=NOW, last_used=last_used)
    assert ids(p.removals) == [sha(0)]  # 125 - 50 = 75 <= 80: one is enough


def test_last_used_is_the_latest_of_id_tags_and_digests() -> None:
    a, b = img(1), img(2)
    last_used = {a.id: 100.0, a.repo_tags[0]: 5000.0, b.repo_digests[0]: 200.0, b.id: 50.0}
    p = plan([a, b], [], usage=usage(200), thresholds=T, now=NOW, last_used=last_used)
    assert ids(p.removals) == [b.id, a.id]
    assert [d.last_used for d in p.removals] == [200.0, 5000.0]


def test_never_used_images_go_first_then_ties_by_size_then_id() -> None:
    images = [img(5, 10), img(3, 10), img(4, 30), img(1, 10)]
    last_used = {sha(1): 7.0}
    p = plan(images, [], usage=usage(200), thresholds=T, now=NOW, last_used=last_used)
    assert ids(p.removals) == [sha(4), sha(3), sha(5), sha(1)]


def test_deterministic_whatever_the_input_order() -> None:
    images = [img(i, 1 + i % 3) for i in range(50)]
    last_used = {sha(i): float(i % 7) for i in range(50)}
    first = plan(images, [], usage=usage(190), thresholds=T, now=NOW, last_used=last_used)
    for seed in range(5):
        shuffled = images[:]
        random.Random(seed).shuffle(shuffled)
        again = plan(shuffled, [], usage=usage(190), thresholds=T, now=NOW, last_used=last_used)
        assert again.decisions == first.decisions


def test_images_in_use_by_any_container_are_kept() -> None:
    images = [img(i) for i in range(6)] + [img(6, tag="docker.io/library/busybox:latest")]
    containers = [
        Container("c-running", image=sha(0), image_ref=sha(0), running=True),
        Container("c-exited", image="reg.example:5000/app1:v1", running=False),  # by tag, not running
        Container("c-digest", image=images[2].repo_digests[0]),  # by digest reference
        Container("c-ref-only", image="", image_ref=sha(3)),
        Container("c-short", image="busybox"),  # short name as a user wrote it
        Container("pod-1", image=sha(4)[7:], kind="sandbox"),  # bare hex id
    ]
    p = plan(images, containers, usage=usage(200), thresholds=T, now=NOW, last_used={})
    d = by_id(p)
    for i in (0, 1, 2, 3, 4, 6):
        assert d[sha(i)] == (KEEP, IN_USE), i
    assert ids(p.removals) == [sha(5)]
    assert p.low_unreachable  # 200 - 10 > 80 and nothing else may go
    detail = next(x.detail for x in p.decisions if x.image.id == sha(0))
    assert detail == "container c-running (running)"


def test_runtime_sandbox_image_is_in_use_without_any_container() -> None:
    pause = img(1, tag="registry.k8s.io/pause:3.9")
    p = plan(
        [pause, img(2)],
        [],
        usage=usage(200),
        thresholds=T,
        now=NOW,
        last_used={},
        in_use_refs=["registry.k8s.io/pause:3.9"],
    )
    assert by_id(p)[pause.id] == (KEEP, IN_USE)


def test_pinned_baked_protected_and_too_recent_are_kept() -> None:
    pinned = img(1, pinned=True)
    baked_by_digest = img(2)
    baked_by_ref = img(3, tag="public.ecr.aws/eks-distro/kubernetes/pause:3.10")
    protected_repo = img(4, tag="docker.io/library/nginx:1.25")
    protected_glob = img(5, tag="reg.example:5000/system/agent:v3")
    recent = img(6)
    old = img(7)
    manifest = [
        BakedImage("reg.example:5000/app2:v1", baked_by_digest.repo_digests[0].split("@")[1], 1, True),
        BakedImage("public.ecr.aws/eks-distro/kubernetes/pause:3.10", sha(999), 1, False),
    ]
    p = plan(
        [pinned, baked_by_digest, baked_by_ref, protected_repo, protected_glob, recent, old],
        [],
        usage=usage(200),
        thresholds=T,
        now=NOW,
        last_used={recent.id: NOW - 599, old.id: NOW - 601},
        protect=["nginx", "reg.example:5000/system/*"],
        baked=manifest,
    )
    d = by_id(p)
    assert d[pinned.id] == (KEEP, PINNED)
    assert d[baked_by_digest.id] == (KEEP, BAKED)
    assert d[baked_by_ref.id] == (KEEP, BAKED)
    assert d[protected_repo.id] == (KEEP, PROTECTED)
    assert d[protected_glob.id] == (KEEP, PROTECTED)
    assert d[recent.id] == (KEEP, TOO_RECENT)
    assert ids(p.removals) == [old.id]
    assert p.low_unreachable
    details = {x.image.id: x.detail for x in p.decisions}
    assert details[protected_repo.id] == "nginx"  # the pattern as the operator wrote it
    assert details[baked_by_ref.id] == "public.ecr.aws/eks-distro/kubernetes/pause:3.10"


def test_in_use_wins_over_other_reasons() -> None:
    both = img(1, pinned=True)
    p = plan([both], [Container("c", image=both.id)], usage=usage(200), thresholds=T, now=NOW, last_used={})
    assert by_id(p)[both.id] == (KEEP, IN_USE)


def test_low_unreachable_only_when_triggered() -> None:
    p = plan([img(1, pinned=True)], [], usage=usage(100), thresholds=T, now=NOW, last_used={})
    assert not p.triggered and not p.low_unreachable


def test_every_image_gets_exactly_one_decision() -> None:
    images = [img(i, pinned=i % 5 == 0) for i in range(40)]
    p = plan(images, [Container("c", image=sha(3))], usage=usage(150), thresholds=T, now=NOW, last_used={})
    assert sorted(ids(p.decisions)) == sorted(i.id for i in images)


def test_protect_matcher_reports_the_first_matching_pattern() -> None:
    m = ProtectMatcher(["", "*/kube-proxy:*", "docker.io/library/*"])
    assert m.match(img(1, tag="docker.io/library/redis:7")) == "docker.io/library/*"
    assert m.match(img(2, tag="registry.k8s.io/kube-proxy:v1.30")) == "*/kube-proxy:*"
    assert m.match(img(3)) is None
    assert ProtectMatcher([]).match(img(3)) is None


def test_protect_by_image_id() -> None:
    assert ProtectMatcher([sha(3)]).match(img(3)) == sha(3)


def test_untagged_image_name_falls_back_to_digest_then_id() -> None:
    assert Image(sha(1), (), ("r/x@" + sha(2),)).name == "r/x@" + sha(2)
    assert Image(sha(1)).name == sha(1)


@pytest.mark.parametrize(("high", "low", "age"), [(50, 60, 0), (101, 10, 0), (60, 40, -1)])
def test_bad_thresholds(high: int, low: int, age: float) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        Thresholds(high, low, age)


def test_ten_thousand_images() -> None:
    rng = random.Random(42)
    n = 10_000
    images = [img(i, size_mb=1 + rng.randrange(20), pinned=i % 97 == 0) for i in range(n)]
    total = sum(i.size for i in images)
    fs = FsUsage(total, int(total / 0.9))  # 90% full
    last_used = {sha(i): NOW - 10_000 - rng.randrange(1_000_000) for i in range(n) if i % 11}
    last_used.update({sha(i): NOW - 10 for i in range(0, n, 13)})  # recently used
    containers = [Container(f"c{i}", image=sha(i), running=i % 2 == 0) for i in range(0, n, 17)]
    p = plan(
        images,
        containers,
        usage=fs,
        thresholds=Thresholds(80, 50),
        now=NOW,
        last_used=last_used,
        protect=["reg.example:5000/app1?:v1"],
    )
    assert len(p.decisions) == n
    assert p.triggered and not p.low_unreachable
    assert p.projected_used_bytes <= p.low_bytes
    # minimal: without the last removal the projection would still be above low
    assert p.projected_used_bytes + p.removals[-1].image.size > p.low_bytes
    kept_ids = {d.image.id for d in p.decisions if d.verdict == KEEP and d.reason != NOT_NEEDED}
    assert kept_ids.isdisjoint(ids(p.removals))
    keys = [(float("-inf") if d.last_used is None else d.last_used) for d in p.removals]
    assert keys == sorted(keys)
    in_use = {sha(i) for i in range(0, n, 17)}
    assert in_use.isdisjoint(ids(p.removals))
    assert {d.reason for d in p.decisions} == {IN_USE, PINNED, PROTECTED, TOO_RECENT, LRU, NOT_NEEDED}
    # not-needed candidates are all more recently used than every removal
    nn = [d.last_used for d in p.decisions if d.reason == NOT_NEEDED]
    assert all(x is not None and x >= keys[-1] for x in nn)


_images = st.lists(
    st.builds(
        lambda n, size, pinned: img(n, size, pinned=pinned),
        st.integers(0, 60),
        st.integers(0, 30),
        st.booleans(),
    ),
    max_size=40,
    unique_by=lambda i: i.id,
)


@settings(max_examples=200, deadline=None)
@given(
    images=_images,
    used=st.integers(0, 200),
    high=st.integers(0, 100),
    gap=st.integers(0, 100),
    in_use=st.sets(st.integers(0, 60), max_size=10),
    times=st.dictionaries(st.integers(0, 60), st.floats(NOW - 5000, NOW), max_size=60),
)
def test_invariants(
    images: list[Image], used: int, high: int, gap: int, in_use: set[int], times: dict[int, float]
) -> None:
    th = Thresholds(high, max(0, high - gap), 1000)
    containers = [Container(f"c{i}", image=sha(i)) for i in in_use]
    last_used = {sha(k): v for k, v in times.items()}
    p = plan(images, containers, usage=usage(used), thresholds=th, now=NOW, last_used=last_used)
    assert sorted(ids(p.decisions)) == sorted(i.id for i in images)
    removed = set(ids(p.removals))
    for d in p.removals:
        assert d.image.id not in {sha(i) for i in in_use}
        assert not d.image.pinned
        assert d.last_used is None or NOW - d.last_used >= 1000
    if not p.triggered:
        assert not removed and not p.low_unreachable
    else:
        candidates = [d for d in p.decisions if d.reason in (LRU, NOT_NEEDED)]
        if p.low_unreachable:
            assert all(d.verdict == REMOVE for d in candidates)
        else:
            assert p.projected_used_bytes <= p.low_bytes


def test_protect_character_classes_and_question_mark() -> None:
    m = ProtectMatcher(["reg.example:5000/app[12]:v1", "reg.example:5000/app[!0-4]:v?"])
    assert m.match(img(1)) == "reg.example:5000/app[12]:v1"
    assert m.match(img(3)) is None
    assert m.match(img(7)) == "reg.example:5000/app[!0-4]:v?"


def test_protect_pattern_naming_a_repository_does_not_match_a_longer_name() -> None:
    m = ProtectMatcher(["reg.example:5000/app1"])
    assert m.match(img(1)) == "reg.example:5000/app1"  # by tag, and by digest reference
    assert m.match(img(12)) is None  # app12 is another repository
    assert ProtectMatcher(["reg.example:5000"]).match(img(1)) is None


def test_in_use_by_for_the_recheck_before_removal() -> None:
    from nodeagent.eviction.policy import in_use_by

    a = img(1)
    assert in_use_by(a, []) is None
    assert in_use_by(a, [Container("x" * 20, image=a.repo_digests[0])]) == "container xxxxxxxxxxxxx"
    assert (
        in_use_by(a, [Container("s", image_ref=a.id, running=True, kind="sandbox")]) == "sandbox s (running)"
    )
    assert in_use_by(a, [], in_use_refs=[a.repo_tags[0]]) == "sandbox image of the runtime"


def test_continuing_goes_on_to_low_below_high() -> None:
    images = [img(i) for i in range(5)]
    last_used = {sha(i): float(i) for i in range(5)}
    fresh = plan(images, [], usage=usage(100), thresholds=T, now=NOW, last_used=last_used)
    assert not fresh.triggered and fresh.removals == ()
    going = plan(images, [], usage=usage(100), thresholds=T, now=NOW, last_used=last_used, continuing=True)
    assert going.triggered and ids(going.removals) == [sha(0), sha(1)]
    done = plan(images, [], usage=usage(80), thresholds=T, now=NOW, last_used=last_used, continuing=True)
    assert not done.triggered
