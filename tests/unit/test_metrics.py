"""nodeagent/run/metrics.py: the contract names (DESIGN.md "Metrics") and bounded label cardinality."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nodeagent.run.metrics import REGISTRY_LABEL_LIMIT, RESULTS, Metrics

# name -> (type, label names) as DESIGN.md lists them (the product contract; wave 2 added `origin`)
CONTRACT = {
    "nodeagent_image_pull_duration_seconds": ("histogram", {"registry", "result", "origin"}),
    "nodeagent_image_pulls": ("counter", {"registry", "result", "origin"}),
    "nodeagent_image_pull_joins": ("counter", {"origin"}),
    "nodeagent_pod_pulls_pods": ("counter", {"result"}),
    "nodeagent_pod_pulls_images": ("counter", {"result"}),
    "nodeagent_pod_images_ready_seconds": ("histogram", set()),
    "nodeagent_pod_pulls_lead_seconds": ("histogram", set()),
    "nodeagent_image_pull_bytes": ("counter", {"registry"}),
    "nodeagent_image_pulls_in_flight": ("gauge", set()),
    "nodeagent_image_last_pull_duration_seconds": ("gauge", {"image"}),
    "nodeagent_image_cache_requests": ("counter", {"result"}),
    "nodeagent_imagefs_used_ratio": ("gauge", set()),
    "nodeagent_image_cache_images": ("gauge", set()),
    "nodeagent_image_cache_bytes": ("gauge", set()),
    "nodeagent_image_evictions": ("counter", {"reason"}),
    "nodeagent_image_evicted_bytes": ("counter", set()),
}


def families(m: Metrics) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}


def test_contract_names_types_and_labels() -> None:
    m = Metrics()
    m.pulls.labels(registry="r", result="success", origin="kubelet").inc()
    m.pull_duration.labels(registry="r", result="success", origin="kubelet").observe(1)
    m.pull_bytes.labels(registry="r").inc(1)
    m.observe_last_pull("r/a:1", 1.0)
    m.cache_requests.labels(result="hit").inc()
    m.pod_images_ready.observe(1)
    m.pod_pulls_lead.observe(1)
    fams = families(m)
    for name, (kind, labels) in CONTRACT.items():
        f = fams[name]
        assert f.type == kind, name
        seen = {k for s in f.samples for k in s.labels if k not in ("le",)}
        assert seen == labels, name
    text = generate_latest(m.registry).decode()
    assert "nodeagent_image_pulls_total{" in text and "nodeagent_image_evicted_bytes_total " in text


def test_pod_pull_label_sets_are_closed_and_present_from_the_start() -> None:
    from nodeagent.proxy.records import ORIGINS
    from nodeagent.run.metrics import POD_IMAGE_RESULTS, POD_RESULTS

    assert ORIGINS == ("kubelet", "pod", "prefetch")
    assert POD_IMAGE_RESULTS == ("pulled", "present", "skipped_policy", "skipped_disk", "failed")
    fams = families(Metrics())
    assert {s.labels["origin"] for s in fams["nodeagent_image_pull_joins"].samples} == set(ORIGINS)
    assert {s.labels["result"] for s in fams["nodeagent_pod_pulls_images"].samples} == set(POD_IMAGE_RESULTS)
    assert {s.labels["result"] for s in fams["nodeagent_pod_pulls_pods"].samples} == set(POD_RESULTS)


def test_result_is_the_closed_design_set() -> None:
    assert RESULTS == (
        "success",
        "not_found",
        "unauthorized",
        "rate_limited",
        "network",
        "no_space",
        "canceled",
        "other",
    )


def test_registry_label_values_are_capped() -> None:
    m = Metrics()
    names = [f"r{i}.example.com" for i in range(REGISTRY_LABEL_LIMIT)]
    assert [m.registry_label(n) for n in names] == names
    assert m.registry_label("one-more.example.com") == "other"
    assert m.registry_label(names[0]) == names[0]  # the ones already seen keep their series
    assert m.registry_label("") == "other"  # "unknown" would be one more value


def test_proxy_method_and_code_fall_back_to_closed_values() -> None:
    m = Metrics()
    m.observe_proxy_request("PullImage", "OK")
    m.observe_proxy_request("/evil/Method-with-user-data", "NOT_A_CODE")
    labels = {
        (s.labels["method"], s.labels["code"])
        for s in families(m)["nodeagent_cri_proxy_requests"].samples
        if s.name.endswith("_total")
    }
    assert labels == {("PullImage", "OK"), ("other", "UNKNOWN")}


def test_per_image_gauge_keeps_the_most_recent_series() -> None:
    m = Metrics(per_image_series_limit=2)
    for image in ("a", "b", "a", "c"):  # "b" is now the least recently pulled
        m.observe_last_pull(image, 1.0)
    images = {s.labels["image"] for s in families(m)["nodeagent_image_last_pull_duration_seconds"].samples}
    assert images == {"a", "c"}


def test_per_image_gauge_off_at_zero() -> None:
    m = Metrics(per_image_series_limit=0)
    m.observe_last_pull("a", 1.0)
    assert not families(m)["nodeagent_image_last_pull_duration_seconds"].samples


def test_degraded_gauge_has_a_closed_component_set() -> None:
    m = Metrics()
    m.set_degraded("upstream", True)
    m.set_degraded("mirrorHealth", False)
    m.set_degraded("some-new-section", True)
    samples = {s.labels["component"]: s.value for s in families(m)["nodeagent_degraded"].samples}
    assert samples == {"upstream": 1.0, "mirrorHealth": 0.0, "other": 1.0}
    m.set_degraded("upstream", False)
    assert 'nodeagent_degraded{component="upstream"} 0.0' in generate_latest(m.registry).decode()
