import io
import json
import os
from pathlib import Path

import pytest

from nodeagent.apply.facts import gather
from nodeagent.apply.runner import BACKUP_SUFFIX, ApplyReport, detect_flavor, redact_headers, run_apply
from nodeagent.apply.targets import is_owned, owned_header
from nodeagent.config.model import Config, EvictionConfig
from nodeagent.util.paths import Paths
from tests.unit.targets.helpers import DATA, config, facts

MIRRORS = """
containerd:
  restartCommand: []
  maxConcurrentDownloads: 5
  mirrors:
    docker.io:
      - endpoint: http://127.0.0.1:4001
        header: {Authorization: "Bearer s3cret-t0ken"}
    quay.io:
      - endpoint: https://quay-cache.example
"""


def _tree(root: Path) -> dict[str, tuple[bytes, int, int]]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = Path(dirpath) / name
            st = p.stat()
            out[str(p.relative_to(root))] = (p.read_bytes(), st.st_mtime_ns, st.st_mode)
    return out


def _stock(root: Path) -> None:
    (root / "etc/containerd").mkdir(parents=True, exist_ok=True)
    (root / "etc/containerd/config.toml").write_text(
        (DATA / "containerd-1.6-config-default.toml").read_text()
    )


def _apply(cfg: Config, root: Path, **kw: object) -> tuple[ApplyReport, str]:
    out = io.StringIO()
    restarts: list[Config] = []
    kw.setdefault("restarter", lambda c: restarts.append(c))
    report = run_apply(cfg, gather(Paths(root), cfg.containerd.hosts_dir), out=out, **kw)  # type: ignore[arg-type]
    return report, out.getvalue()


def test_generic_apply_writes_backs_up_once_and_second_apply_changes_nothing(tmp_path: Path) -> None:
    _stock(tmp_path)
    original = (tmp_path / "etc/containerd/config.toml").read_bytes()
    cfg = config(MIRRORS)
    report, _ = _apply(cfg, tmp_path, flavor="generic")
    assert report.ok, report.errors
    assert sorted(Path(p).relative_to(tmp_path).as_posix() for p in report.changed) == [
        "etc/containerd/certs.d/docker.io/hosts.toml",
        "etc/containerd/certs.d/quay.io/hosts.toml",
        "etc/containerd/config.toml",
        "etc/kubernetes/kubelet.conf.d/90-nodeagent.conf",
    ]
    backup = tmp_path / ("etc/containerd/config.toml" + BACKUP_SUFFIX)
    assert backup.read_bytes() == original
    assert (tmp_path / "etc/containerd/certs.d/docker.io/hosts.toml").stat().st_mode & 0o777 == 0o600
    before = _tree(tmp_path)
    report2, _ = _apply(cfg, tmp_path, flavor="generic")
    assert report2.ok and report2.changed == [] and report2.backups == []
    assert _tree(tmp_path) == before  # content, mtime and mode of every file unchanged


def test_backup_is_kept_from_the_first_replacement_only(tmp_path: Path) -> None:
    _stock(tmp_path)
    original = (tmp_path / "etc/containerd/config.toml").read_bytes()
    _apply(config(), tmp_path, flavor="generic")
    _apply(config("containerd:\n  maxConcurrentDownloads: 9\n"), tmp_path, flavor="generic")
    assert (tmp_path / ("etc/containerd/config.toml" + BACKUP_SUFFIX)).read_bytes() == original


def test_containerd_restart_only_when_its_config_changed(tmp_path: Path) -> None:
    _stock(tmp_path)
    calls: list[Config] = []
    r, _ = _apply(config(), tmp_path, flavor="generic", restarter=lambda c: calls.append(c))
    assert len(calls) == 1 and r.containerd_restarted
    r, _ = _apply(config(), tmp_path, flavor="generic", restarter=lambda c: calls.append(c))
    assert len(calls) == 1 and not r.containerd_restarted


def test_unhealthy_restart_restores_previous_config_and_fails(tmp_path: Path) -> None:
    _stock(tmp_path)
    cfg_file = tmp_path / "etc/containerd/config.toml"
    original = cfg_file.read_bytes()
    seen: list[bytes] = []

    def restarter(c: Config) -> str | None:
        seen.append(cfg_file.read_bytes())
        return "CRI Version did not answer" if len(seen) == 1 else None

    report, _ = _apply(config(), tmp_path, flavor="generic", restarter=restarter)
    assert not report.ok
    assert "previous" in report.errors[0] and "CRI Version did not answer" in report.errors[0]
    assert seen[0] != original and seen[1] == original  # restarted on new, then on restored config
    assert cfg_file.read_bytes() == original
    assert str(cfg_file) not in report.changed


def test_dry_run_prints_diffs_and_leaves_tree_byte_identical(tmp_path: Path) -> None:
    _stock(tmp_path)
    before = _tree(tmp_path)
    report, out = _apply(config(MIRRORS), tmp_path, flavor="generic", dry_run=True)
    assert report.ok and len(report.changed) == 4
    assert _tree(tmp_path) == before
    assert "+++ " + str(tmp_path / "etc/kubernetes/kubelet.conf.d/90-nodeagent.conf") in out
    assert "-    max_concurrent_downloads = 3" in out
    assert "s3cret-t0ken" not in out and "<redacted>" in out  # header values never printed


def test_unsafe_registry_name_writes_nothing_at_all(tmp_path: Path) -> None:
    _stock(tmp_path)
    before = _tree(tmp_path)
    bad = Config(containerd=config().containerd.__class__(mirrors=(("../../etc", ()),), restart_command=()))
    report, _ = _apply(bad, tmp_path, flavor="generic")
    assert not report.ok and "mirrors" in report.errors[0]
    assert _tree(tmp_path) == before


def test_only_our_stale_hosts_files_are_removed(tmp_path: Path) -> None:
    _stock(tmp_path)
    _apply(config(MIRRORS), tmp_path, flavor="generic")
    theirs = tmp_path / "etc/containerd/certs.d/theirs.io/hosts.toml"
    theirs.parent.mkdir()
    theirs.write_text('server = "https://theirs.io"\n')
    report, _ = _apply(
        config(
            "containerd:\n  restartCommand: []\n  mirrors:\n    quay.io:\n      - endpoint: https://q.example\n"
        ),
        tmp_path,
        flavor="generic",
    )
    assert report.removed == [str(tmp_path / "etc/containerd/certs.d/docker.io/hosts.toml")]
    assert not (tmp_path / "etc/containerd/certs.d/docker.io").exists()
    assert theirs.exists()


def test_file_we_do_not_own_at_our_path_is_backed_up_then_owned(tmp_path: Path) -> None:
    p = tmp_path / "etc/containerd/certs.d/quay.io/hosts.toml"
    p.parent.mkdir(parents=True)
    p.write_text('server = "https://hand-written"\n')
    _stock(tmp_path)
    report, _ = _apply(config(MIRRORS), tmp_path, flavor="generic")
    assert report.ok
    assert (p.parent / ("hosts.toml" + BACKUP_SUFFIX)).read_text() == 'server = "https://hand-written"\n'
    assert is_owned(p.read_text())


def test_eks_flavor_writes_nodeadm_dropin_and_leaves_containerd_config_alone(tmp_path: Path) -> None:
    _stock(tmp_path)
    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/nodeadm").write_text("")
    before = (tmp_path / "etc/containerd/config.toml").read_bytes()
    calls: list[Config] = []
    report, _ = _apply(config(MIRRORS), tmp_path, restarter=lambda c: calls.append(c))
    assert report.flavor == "eks-al2023" and report.ok
    assert (tmp_path / "etc/eks/nodeadm.d/90-nodeagent.yaml").exists()
    assert (tmp_path / "etc/containerd/config.toml").read_bytes() == before
    assert not (tmp_path / "etc/kubernetes").exists() and calls == []


def test_detect_flavor(tmp_path: Path) -> None:
    assert detect_flavor(facts(tmp_path)) == "generic"
    assert detect_flavor(facts(tmp_path, nodeadm_present=True)) == "eks-al2023"


def test_warnings_reach_the_report(tmp_path: Path) -> None:
    # valid config, but the kubelet's GC would act before nodeagent: apply warns (issue 3), status shows it
    cfg = Config(eviction=EvictionConfig(high_threshold_percent=90, low_threshold_percent=80))
    report, _ = _apply(cfg, tmp_path, flavor="generic")
    assert any("eviction.highThresholdPercent (90)" in w for w in report.warnings)
    report.write(Paths(tmp_path))
    saved = json.loads(Paths(tmp_path).apply_report_file.read_text())
    assert saved["result"] == "ok" and saved["warnings"] == report.warnings
    assert saved["tuning"][0]["key"] == "kubelet.maxParallelImagePulls"


def test_write_error_in_one_target_does_not_stop_the_others(tmp_path: Path) -> None:
    _stock(tmp_path)
    (tmp_path / "etc/kubernetes").mkdir(parents=True)
    (tmp_path / "etc/kubernetes/kubelet.conf.d").write_text("a file where a directory should be")
    report, _ = _apply(config(MIRRORS), tmp_path, flavor="generic")
    assert not report.ok and report.errors[0].startswith("kubelet:")
    assert (tmp_path / "etc/containerd/certs.d/quay.io/hosts.toml").exists()


def test_redact_headers_keeps_names() -> None:
    text = (
        owned_header("x") + '[host."h"]\n  capabilities = ["pull"]\n  [host."h".header]\n    "A" = ["tok"]\n'
    )
    red = redact_headers(text)
    assert "tok" not in red and '"A" = ["<redacted>"]' in red and 'capabilities = ["pull"]' in red


@pytest.mark.parametrize("flavor", ["generic", "eks-al2023"])
def test_render_error_reported_per_target(tmp_path: Path, flavor: str) -> None:
    (tmp_path / "etc/containerd").mkdir(parents=True)
    (tmp_path / "etc/containerd/config.toml").write_text("version = 1\n")
    report, _ = _apply(config(), tmp_path, flavor=flavor)
    if flavor == "generic":
        assert report.errors and report.errors[0].startswith("containerd:") and report.changed == []
    else:
        assert report.ok  # no version 2/3 config and no binary: containerd 2.x assumed, with a warning
        assert any("containerd 2.x (what AL2023 ships) is assumed" in w for w in report.warnings)


def test_temp_files_left_by_a_killed_run_are_cleaned(tmp_path: Path) -> None:
    _stock(tmp_path)
    leftover = tmp_path / "etc/containerd/.config.toml.abc123.tmp"
    leftover.write_text("half")
    unrelated = tmp_path / "etc/containerd/.other.tmp"
    unrelated.write_text("x")
    _apply(config(), tmp_path, flavor="generic")
    assert not leftover.exists() and unrelated.exists()


def test_default_restart_command_never_restarts_the_hosts_containerd_for_a_root_tree(tmp_path: Path) -> None:
    _stock(tmp_path)
    # run_apply without a restarter: the real restart path decides, and must not run systemctl here
    report = run_apply(config(), gather(Paths(tmp_path)), flavor="generic", out=io.StringIO())
    assert report.ok and not report.containerd_restarted
    assert any("would restart this host's containerd" in w for w in report.warnings)


def test_redact_headers_masks_a_mirror_only_servers_top_level_header() -> None:
    text = (
        'server = "http://m"\ncapabilities = ["pull"]\n\n[header]\n  "Authorization" = ["Basic c2VjcmV0"]\n'
    )
    red = redact_headers(text)
    assert (
        "c2VjcmV0" not in red and '"Authorization" = ["<redacted>"]' in red and 'server = "http://m"' in red
    )


# --- generic flavor: does the kubelet read the drop-in? (first-use friction) ------------------------
def _kubelet_proc(root: Path, *argv: str) -> None:
    d = root / "proc/4242"
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")


def test_generic_apply_warns_when_the_running_kubelet_has_no_config_dir(tmp_path: Path) -> None:
    _stock(tmp_path)
    _kubelet_proc(tmp_path, "/usr/bin/kubelet", "--config=/var/lib/kubelet/config.yaml")
    report, _ = _apply(config(), tmp_path, flavor="generic")
    assert (
        "the running kubelet (pid 4242) has no --config-dir, so it never reads nodeagent's drop-in: add "
        "--config-dir=/etc/kubernetes/kubelet.conf.d to the kubelet's command line (a drop-in of "
        "kubelet.service) and restart it"
    ) in report.warnings


def test_generic_apply_says_to_restart_the_kubelet_only_when_the_dropin_changed(tmp_path: Path) -> None:
    _stock(tmp_path)
    _kubelet_proc(tmp_path, "/usr/bin/kubelet", "--config-dir", "/etc/kubernetes/kubelet.conf.d")
    report, _ = _apply(config(), tmp_path, flavor="generic")
    assert not any("kubelet" in w for w in report.warnings)
    assert (
        "kubelet drop-in changed; the running kubelet (pid 4242) has "
        "--config-dir=/etc/kubernetes/kubelet.conf.d, and the kubelet reads its drop-ins only when it "
        "starts: restart it (systemctl restart kubelet)"
    ) in report.notes
    again, _ = _apply(config(), tmp_path, flavor="generic")
    assert not again.changed and not any("kubelet" in n for n in again.notes)


def test_generic_apply_checks_the_kubelet_unit_when_no_kubelet_runs(tmp_path: Path) -> None:
    _stock(tmp_path)
    report, _ = _apply(config(), tmp_path, flavor="generic")
    assert any(
        "the kubelet must run with --config-dir=/etc/kubernetes/kubelet.conf.d" in n for n in report.notes
    )
    (tmp_path / "etc/kubernetes/kubelet.conf.d/90-nodeagent.conf").unlink()  # so that it changes again
    unit = tmp_path / "etc/systemd/system/kubelet.service.d/10-kubeadm.conf"
    unit.parent.mkdir(parents=True)
    unit.write_text(
        "[Service]\nExecStart=\nExecStart=/usr/bin/kubelet --config-dir=/etc/kubernetes/kubelet.conf.d\n"
    )
    report, _ = _apply(config(), tmp_path, flavor="generic")
    assert f"kubelet drop-in changed; {unit} passes --config-dir=/etc/kubernetes/kubelet.conf.d" in " ".join(
        report.notes
    )


def test_mirror_ca_files_are_looked_up_under_root_as_containerd_reads_them(tmp_path: Path) -> None:
    _stock(tmp_path)
    cfg = config(
        "containerd:\n  restartCommand: []\n  mirrors:\n    q.io:\n      - endpoint: https://m.example\n"
        "        ca: /etc/pki/mirror.pem\n"
    )
    report, _ = _apply(cfg, tmp_path, flavor="generic", dry_run=True)
    assert [w for w in report.warnings if ".ca:" in w] == [
        f"containerd.mirrors.q.io[0].ca: /etc/pki/mirror.pem (read as {tmp_path}/etc/pki/mirror.pem) "
        "does not exist: containerd and the mirror probes cannot verify this mirror's certificate",
    ]
    (tmp_path / "etc/pki").mkdir()
    (tmp_path / "etc/pki/mirror.pem").write_text("cert")
    report, _ = _apply(cfg, tmp_path, flavor="generic", dry_run=True)
    assert not [w for w in report.warnings if ".ca:" in w]
