import re
from pathlib import Path

import pytest
import yaml

from nodeagent.apply.targets import TargetError, is_owned, kubelet
from nodeagent.config.model import Config, KubeletConfig
from tests.unit.targets.helpers import DATA, config, facts

V1BETA1_FIELDS = set((DATA / "kubelet-config-v1beta1-fields.txt").read_text().split())
GO_DURATION = re.compile(r"^(?:0s|(?:[0-9]+h)?(?:[0-9]+m)?(?:[0-9.]+(?:s|ms|us|ns))?)$")


def _dropin(cfg: Config, tmp_path: Path) -> tuple[Path, dict]:  # type: ignore[type-arg]
    (f,) = kubelet.render(cfg, facts(tmp_path)).files
    assert is_owned(f.content)
    return f.path, yaml.safe_load(f.content)


def test_dropin_is_a_conf_file_with_apiversion_kind_and_only_v1beta1_keys(tmp_path: Path) -> None:
    path, doc = _dropin(config("kubelet:\n  imageMaximumGCAge: 1h\n"), tmp_path)
    assert path.parent == tmp_path / "etc/kubernetes/kubelet.conf.d" and path.suffix == ".conf"
    assert doc["apiVersion"] == "kubelet.config.k8s.io/v1beta1" and doc["kind"] == "KubeletConfiguration"
    assert set(doc) <= V1BETA1_FIELDS
    assert set(kubelet.FIELDS) <= V1BETA1_FIELDS
    # values valid by the kubelet's own rules
    assert doc["serializeImagePulls"] is False and doc["maxParallelImagePulls"] >= 1
    assert 0 <= doc["imageGCLowThresholdPercent"] < doc["imageGCHighThresholdPercent"] <= 100
    assert doc["registryPullQPS"] >= 0 and doc["registryBurst"] >= 0
    for key in ("imageMinimumGCAge", "imageMaximumGCAge"):
        assert GO_DURATION.match(doc[key]), doc[key]
    assert (doc["imageMinimumGCAge"], doc["imageMaximumGCAge"]) == ("2m0s", "1h0m0s")
    assert doc["imageServiceEndpoint"] == "unix:///run/nodeagent/cri.sock"


def test_serialized_pulls_leave_max_parallel_out(tmp_path: Path) -> None:
    _, doc = _dropin(config("kubelet:\n  serializeImagePulls: true\n  maxParallelImagePulls: 1\n"), tmp_path)
    assert doc["serializeImagePulls"] is True and "maxParallelImagePulls" not in doc


def test_zero_max_gc_age_and_no_proxy_are_left_out(tmp_path: Path) -> None:
    _, doc = _dropin(config('cri:\n  proxySocket: ""\n'), tmp_path)
    assert "imageMaximumGCAge" not in doc and "imageServiceEndpoint" not in doc


def test_explicit_parallel_pulls_used(tmp_path: Path) -> None:
    _, doc = _dropin(config("kubelet:\n  maxParallelImagePulls: 7\n"), tmp_path)
    assert doc["maxParallelImagePulls"] == 7


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(image_gc_high_threshold_percent=80, image_gc_low_threshold_percent=80), "must be less than"),
        (dict(image_gc_high_threshold_percent=101), "between 0 and 100"),
        (dict(image_minimum_gc_age=600.0, image_maximum_gc_age=300.0), "greater than imageMinimumGCAge"),
        (dict(registry_burst=-1), "registryBurst"),
    ],
)
def test_kubelet_rules_enforced_even_on_a_hand_built_config(tmp_path: Path, kw: dict, match: str) -> None:  # type: ignore[type-arg]
    cfg = Config(kubelet=KubeletConfig(**kw))
    with pytest.raises(TargetError, match=match):
        kubelet.render(cfg, facts(tmp_path))


def test_main_config_with_empty_lists_warns_about_config_dir(tmp_path: Path) -> None:
    main = tmp_path / "var/lib/kubelet/config.yaml"
    text = (
        "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\n"
        "enforceNodeAllocatable: []\nevictionHard: {}\nclusterDNS: [10.0.0.10]\n"
    )
    plan = kubelet.render(config(), facts(tmp_path, kubelet_main_configs=((main, text),)))
    (w,) = plan.warnings
    assert w.startswith(f"{main} sets enforceNodeAllocatable: [], evictionHard: {{}}: with --config-dir")
    assert 'becomes ["pods"]' in w
    quiet = text.replace("enforceNodeAllocatable: []\nevictionHard: {}\n", "")
    assert kubelet.render(config(), facts(tmp_path, kubelet_main_configs=((main, quiet),))).warnings == []
    assert kubelet.empty_collections("kind: Other\nx: []\n") == [] and kubelet.empty_collections("[") == []
