import tomllib
from pathlib import Path

import pytest

from nodeagent.apply.targets import TargetError, is_owned, pullpath
from nodeagent.apply.targets import containerd as ctd
from tests.unit.targets.helpers import DATA, config, facts

V = ctd.Values(
    max_concurrent_downloads=6, image_pull_progress_timeout="5m0s", hosts_dir="/etc/containerd/certs.d"
)
OWNED_KEYS = ("max_concurrent_downloads", "image_pull_progress_timeout", "config_path")


def _unrelated_lines_kept(before: str, after: str) -> None:
    """Every line of the original that does not set one of our keys is in the output, in order."""
    kept = [ln for ln in before.splitlines() if not ln.strip().startswith(OWNED_KEYS)]
    out = after.splitlines()
    i = 0
    for line in kept:
        while i < len(out) and out[i] != line:
            i += 1
        assert i < len(out), f"line lost or reordered: {line!r}"
        i += 1


def _strip_owned(doc: dict) -> dict:  # type: ignore[type-arg]
    out = {}
    for k, v in doc.items():
        if k in OWNED_KEYS or k == "io.containerd.transfer.v1.local":
            continue
        out[k] = _strip_owned(v) if isinstance(v, dict) else v
    return out


@pytest.mark.parametrize("name", ["containerd-v2-commented.toml", "containerd-1.6-config-default.toml"])
def test_v2_round_trip_keeps_everything_else(name: str) -> None:
    before = (DATA / name).read_text()
    p = ctd.patch(before, V)
    assert p.version == 2
    _unrelated_lines_kept(before, p.text)
    doc = tomllib.loads(p.text)
    cri = doc["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["max_concurrent_downloads"] == 6
    assert cri["image_pull_progress_timeout"] == "5m0s"
    assert cri["registry"]["config_path"].split(":")[0] == "/etc/containerd/certs.d"
    assert _strip_owned(doc) == _strip_owned(tomllib.loads(before))
    assert ctd.patch(p.text, V).text == p.text  # patching again changes nothing


def test_v2_existing_config_path_dirs_are_kept_after_ours() -> None:
    p = ctd.patch((DATA / "containerd-v2-commented.toml").read_text(), V)
    assert p.config_path == "/etc/containerd/certs.d:/etc/docker/certs.d"


def test_v3_round_trip_keeps_everything_else() -> None:
    before = (DATA / "containerd-v3-commented.toml").read_text()
    p = ctd.patch(before, V)
    assert p.version == 3
    _unrelated_lines_kept(before, p.text)
    doc = tomllib.loads(p.text)
    images = doc["plugins"]["io.containerd.cri.v1.images"]
    assert images["max_concurrent_downloads"] == 6
    assert images["image_pull_progress_timeout"] == "5m0s"
    # already listed: left exactly as it was
    assert images["registry"]["config_path"] == "/etc/containerd/certs.d:/etc/docker/certs.d"
    # nodeadm's discard_unpacked_layers = true keeps every containerd on local pull: the CRI value counts
    assert "io.containerd.transfer.v1.local" not in doc["plugins"]
    assert "io.containerd.grpc.v1.cri" not in doc["plugins"]
    assert _strip_owned(doc) == _strip_owned(tomllib.loads(before))
    assert ctd.patch(p.text, V).text == p.text


def test_values_already_right_leave_file_byte_identical() -> None:
    text = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  max_concurrent_downloads = 6\n'
        '  image_pull_progress_timeout = "5m0s"\n  [plugins."io.containerd.grpc.v1.cri".registry]\n'
        '    config_path = "/etc/containerd/certs.d"\n'
    )
    assert ctd.patch(text, V).text == text


def test_missing_file_becomes_minimal_owned_v2_config() -> None:
    p = ctd.patch(None, V)
    assert is_owned(p.text)
    doc = tomllib.loads(p.text)
    assert doc["version"] == 2
    assert doc["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("[plugins.cri]\n  x = 1\n", "version = 1"),
        ("version = 2\n[broken", "not valid TOML"),
        ('version = "2"\n', "not a containerd config version"),
        ("version = 5\n", "only containerd config versions 2, 3 and 4"),
    ],
)
def test_unsupported_files_refused(text: str, match: str) -> None:
    with pytest.raises(TargetError, match=match):
        ctd.patch(text, V)


def test_legacy_registry_mirrors_block_config_path_with_warning() -> None:
    text = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry.mirrors."docker.io"]\n'
        '  endpoint = ["https://mirror.example"]\n'
    )
    p = ctd.patch(text, V)
    assert "config_path" not in p.text
    assert any("registry.mirrors" in w for w in p.warnings)
    assert any("no plugins.io.containerd.grpc.v1.cri.registry.config_path" in w for w in p.warnings)


def test_discard_unpacked_layers_with_spegel_warns() -> None:
    text = (DATA / "containerd-v3-commented.toml").read_text()
    assert any("Spegel" in w for w in ctd.patch(text, V, spegel=["http://127.0.0.1:30020"]).warnings)
    assert not any("Spegel" in w for w in ctd.patch(text, V, spegel=[]).warnings)
    v2 = (DATA / "containerd-v2-commented.toml").read_text()  # discard_unpacked_layers = false
    assert not any("Spegel" in w for w in ctd.patch(v2, V, spegel=["http://127.0.0.1:30020"]).warnings)


def test_render_uses_tuning_and_existing_file(tmp_path: Path) -> None:
    cfg = config("containerd:\n  maxConcurrentDownloads: 7\n  imagePullProgressTimeout: 90s\n")
    text = (DATA / "containerd-v2-commented.toml").read_text()
    plan = ctd.render(cfg, facts(tmp_path, containerd_config=text))
    assert plan.restart_on_change
    (f,) = plan.files
    assert f.path == tmp_path / "etc/containerd/config.toml" and not f.owned
    cri = tomllib.loads(f.content)["plugins"]["io.containerd.grpc.v1.cri"]
    assert (cri["max_concurrent_downloads"], cri["image_pull_progress_timeout"]) == (7, "1m30s")


def test_render_error_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=r"etc/containerd/config.toml: not valid TOML"):
        ctd.render(config(), facts(tmp_path, containerd_config="version = 2\n[x"))


def test_fragment_parses_for_both_versions() -> None:
    v2 = tomllib.loads(ctd.fragment(2, V))
    assert v2["plugins"]["io.containerd.grpc.v1.cri"]["max_concurrent_downloads"] == 6
    v3 = tomllib.loads(ctd.fragment(3, V, "/a:/b"))
    assert v3["plugins"]["io.containerd.cri.v1.images"]["registry"]["config_path"] == "/a:/b"


# --- the pull path (containerd 2.2.9 source: internal/cri/config.CheckLocalImagePullConfigs) ---------

V3_PLAIN = (
    "version = 3\n[plugins.'io.containerd.cri.v1.images']\n  snapshotter = \"overlayfs\"\n"
    "[plugins.'io.containerd.cri.v1.images'.registry]\n  config_path = \"/etc/containerd/certs.d\"\n"
)


def _downloads(text: str) -> tuple[object, object]:
    """(CRI max_concurrent_downloads, transfer service max_concurrent_downloads) of a config."""
    doc = tomllib.loads(text)
    plugins = doc.get("plugins", {})
    images = plugins.get("io.containerd.cri.v1.images") or plugins.get("io.containerd.grpc.v1.cri") or {}
    return images.get("max_concurrent_downloads"), plugins.get(pullpath.V3_TRANSFER, {}).get(
        "max_concurrent_downloads"
    )


@pytest.mark.parametrize(
    ("containerd", "transfer"),
    [
        ((2, 2, 9), True),
        ((2, 1, 0), True),
        ((2, 0, 7), False),
        ((1, 7, 27), False),
        ((1, 6, 20), False),
        (None, False),
    ],
)
def test_concurrency_goes_where_containerd_pulls(
    containerd: tuple[int, int, int] | None, transfer: bool
) -> None:
    p = ctd.patch(V3_PLAIN, V, containerd=containerd)
    assert p.pull.transfer is transfer
    # on the transfer path the CRI table never gets a value that would make containerd leave it
    assert _downloads(p.text) == ((None, 6) if transfer else (6, None))
    assert ctd.patch(p.text, V, containerd=containerd).text == p.text


@pytest.mark.parametrize(
    ("setting", "reason"),
    [
        ("discard_unpacked_layers = true", "discard_unpacked_layers = true"),
        ("use_local_image_pull = true", "use_local_image_pull = true"),
        ("disable_snapshot_annotations = false", "disable_snapshot_annotations = false"),
        ("image_pull_with_sync_fs = true", "image_pull_with_sync_fs = true"),
    ],
)
def test_a_setting_that_forces_local_pull_puts_concurrency_in_cri(setting: str, reason: str) -> None:
    text = V3_PLAIN.replace('snapshotter = "overlayfs"', setting)
    p = ctd.patch(text, V, containerd=(2, 2, 9))
    assert not p.pull.transfer and reason in p.pull.reason
    assert _downloads(p.text) == (6, None)


def test_settings_that_keep_transfer_do_not_force_local() -> None:
    text = V3_PLAIN.replace(
        'snapshotter = "overlayfs"', "discard_unpacked_layers = false\n  disable_snapshot_annotations = true"
    )
    assert ctd.patch(text, V, containerd=(2, 2, 9)).pull.transfer


def test_v2_config_on_containerd_2_forced_local_by_its_containerd_table() -> None:
    v2 = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  discard_unpacked_layers = true\n'
    assert not ctd.patch(v2, V, containerd=(2, 2, 9)).pull.transfer
    plain = 'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n  snapshotter = "overlayfs"\n'
    p = ctd.patch(plain, V, containerd=(2, 2, 9))  # containerd 2.x migrates a version-2 file on load
    assert p.pull.transfer and _downloads(p.text) == (None, 6)


def test_own_cri_value_from_an_older_apply_is_set_back_to_3() -> None:
    """What apply wrote before this fix (cri 6 + transfer 6) made containerd 2.1+ fall back to local."""
    old = V3_PLAIN.replace(
        'snapshotter = "overlayfs"', 'snapshotter = "overlayfs"\n  max_concurrent_downloads = 6'
    )
    old += '[plugins."io.containerd.transfer.v1.local"]\n  max_concurrent_downloads = 6\n'
    p = ctd.patch(old, V, containerd=(2, 2, 9))
    assert p.pull.transfer and _downloads(p.text) == (3, 6)
    assert pullpath.local_pull_reasons(pullpath.cri_image_settings(tomllib.loads(p.text), 3)) == []


@pytest.mark.parametrize(
    ("containerd", "version", "expected"),
    [
        ((2, 2, 9), 3, "/etc/containerd/certs.d:/etc/docker/certs.d"),
        ((2, 2, 0), 2, "/etc/containerd/certs.d:/etc/docker/certs.d"),
        ((2, 1, 9), 3, "/etc/containerd/certs.d"),
        ((1, 6, 20), 2, "/etc/containerd/certs.d"),
        (None, 3, "/etc/containerd/certs.d:/etc/docker/certs.d"),
        (None, 2, "/etc/containerd/certs.d"),
    ],
)
def test_empty_config_path_is_containerds_own_default(
    containerd: tuple[int, int, int] | None, version: int, expected: str
) -> None:
    """On the local pull path (here forced by nodeadm's discard_unpacked_layers), which splits the list."""
    table = "io.containerd.cri.v1.images" if version == 3 else "io.containerd.grpc.v1.cri"
    text = (
        f'version = {version}\n[plugins."{table}".registry]\n  config_path = ""\n'
        f'[plugins."{table}".containerd]\n  discard_unpacked_layers = true\n'
        f'[plugins."{table}"]\n  discard_unpacked_layers = true\n'
    )
    p = ctd.patch(text, V, containerd=containerd)
    assert not p.pull.transfer and p.config_path == expected


def test_transfer_path_gets_the_hosts_dir_alone_and_says_what_it_left_out() -> None:
    """containerd's transfer service reads config_path as one directory (a list finds nothing)."""
    p = ctd.patch(V3_PLAIN.replace('"/etc/containerd/certs.d"', '""'), V, containerd=(2, 2, 9))
    assert p.pull.transfer and p.config_path == "/etc/containerd/certs.d"
    (w,) = [w for w in p.warnings if "config_path is set to" in w]
    assert "hosts.toml files in /etc/docker/certs.d are not read on this path" in w
    same = ctd.patch(V3_PLAIN, V, containerd=(2, 2, 9))  # already the hosts dir alone: nothing to say
    assert same.config_path == "/etc/containerd/certs.d" and not any(
        "config_path" in w for w in same.warnings
    )


def test_render_notes_where_concurrency_went_and_warns_on_unknown_version(tmp_path: Path) -> None:
    plan = ctd.render(config(), facts(tmp_path, containerd_config=V3_PLAIN, containerd_version=(2, 2, 9)))
    assert plan.notes == [
        "containerd download concurrency goes to plugins.io.containerd.transfer.v1.local: "
        "containerd 2.2.9 pulls CRI images through the transfer service"
    ]
    assert not any("version unknown" in w for w in plan.warnings)
    plan = ctd.render(config(), facts(tmp_path, containerd_config=V3_PLAIN))
    assert "plugins.io.containerd.cri.v1.images" in plan.notes[0]
    assert any("containerd version unknown" in w for w in plan.warnings)


def test_nodeadm_v2_template_order_is_patched() -> None:
    """nodeadm's version-2 template defines [...cri.containerd] before [...cri] (a table in pieces)."""
    text = (
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\ndefault_runtime_name = "runc"\n'
        'discard_unpacked_layers = true\n\n[plugins."io.containerd.grpc.v1.cri"]\n'
        'sandbox_image = "localhost/kubernetes/pause"\n\n[plugins."io.containerd.grpc.v1.cri".registry]\n'
        'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n'
    )
    p = ctd.patch(text, V, containerd=(2, 2, 9))
    cri = tomllib.loads(p.text)["plugins"]["io.containerd.grpc.v1.cri"]
    assert not p.pull.transfer and cri["max_concurrent_downloads"] == 6
    assert (
        cri["sandbox_image"] == "localhost/kubernetes/pause" and cri["containerd"]["discard_unpacked_layers"]
    )
    assert ctd.patch(p.text, V, containerd=(2, 2, 9)).text == p.text


def test_version_4_of_containerd_2_4_uses_the_version_3_image_tables() -> None:
    """containerd 2.4's `config default` is version 4: server addresses under plugins, CRI images as in 3."""
    text = (
        "version = 4\n[plugins]\n  [plugins.'io.containerd.cri.v1.images']\n"
        "    max_concurrent_downloads = 3\n"
        "    [plugins.'io.containerd.cri.v1.images'.registry]\n      config_path = ''\n"
        "  [plugins.'io.containerd.server.v1.grpc']\n    address = '/run/containerd/containerd.sock'\n"
    )
    p = ctd.patch(text, V, containerd=(2, 4, 2))
    assert p.version == 4 and p.pull.transfer
    assert _downloads(p.text) == (3, 6) and p.config_path == "/etc/containerd/certs.d"
    assert tomllib.loads(p.text)["plugins"]["io.containerd.server.v1.grpc"]["address"].endswith(".sock")
