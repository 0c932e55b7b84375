#!/usr/bin/env bash
# Install nodeagent into a node image (run by Packer on the build instance, or into a tree by tests).
#
#   ami/install.sh --wheel nodeagent-X-py3-none-any.whl [--root DIR] [--config FILE] [--images FILE]
#
# - /opt/nodeagent: a Python 3.11 venv holding the wheel and its dependencies
# - /etc/nodeagent/config.yaml: FILE (default ami/config.yaml) with its `images:` section replaced by
#   the images file (default ami/images.yaml), validated before it is installed
# - /etc/systemd/system: the units from systemd/ (next to ami/ or --units DIR: three services and
#   nodeagent.socket), the kubelet drop-in, and the enable symlinks (made by hand, so that --root
#   works without a running systemd)
# Inputs are checked before anything is written. With --root / it also runs `systemctl daemon-reload`.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=/
wheel=""
config="$here/config.yaml"
images="$here/images.yaml"
units="$here/../systemd"
python=${PYTHON:-python3.11}

die() { echo "install.sh: $*" >&2; exit 1; }
usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }

while (($#)); do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
    --config) config=${2:?--config needs a file}; shift 2 ;;
    --images) images=${2:?--images needs a file}; shift 2 ;;
    --units) units=${2:?--units needs a directory}; shift 2 ;;
    --python) python=${2:?--python needs an interpreter}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown argument: $1" >&2; usage 2 ;;
  esac
done

# --- check every input before writing anything -------------------------------------------------
[ -n "$wheel" ] || die "--wheel is required"
[ -f "$wheel" ] || die "$wheel: no such wheel"
case "$wheel" in *.whl) ;; *) die "$wheel: not a wheel (.whl)" ;; esac
[ -f "$config" ] || die "$config: no such config file"
[ -f "$images" ] || die "$images: no such images file"
for u in nodeagent-apply.service nodeagent-prefetch.service nodeagent.service nodeagent.socket kubelet.service.d/10-nodeagent.conf; do
  [ -f "$units/$u" ] || die "$units/$u: missing unit file"
done
[ -d "$root" ] || die "$root: root directory does not exist"
root=$(cd "$root" && pwd)
r=${root%/}   # "" for /, so "$r/etc" is /etc

if ! command -v "$python" >/dev/null 2>&1; then
  if [ -z "$r" ] && command -v dnf >/dev/null 2>&1; then
    dnf install -y -q python3.11   # AL2023: python3 is 3.9; 3.11 is a separate package
  fi
  command -v "$python" >/dev/null 2>&1 || die "$python: not found (nodeagent needs Python 3.11)"
fi
"$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 11) else 1)' \
  || die "$python: Python 3.11 or newer is required"

# --- the venv (the previous one is kept aside until the new config validates) ------------------
venv="$r/opt/nodeagent"
work=$(mktemp -d)
opt_existed=no; if [ -d "$r/opt" ]; then opt_existed=yes; fi
rollback() {
  rm -rf "$work" "$venv"
  if [ -d "$venv.previous" ]; then mv "$venv.previous" "$venv"; fi
  if [ "$opt_existed" = no ]; then rmdir "$r/opt" 2>/dev/null || true; fi
}
trap rollback EXIT
rm -rf "$venv.previous"
if [ -e "$venv" ]; then mv "$venv" "$venv.previous"; fi
echo "install.sh: venv $venv"
# A venv records its own path in its scripts, so it is built in place.
"$python" -m venv "$venv"
# pip's own index/find-links settings (pip.conf, PIP_* variables) apply as usual.
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input "$wheel"
"$venv/bin/python" -m compileall -q "$venv/lib" >/dev/null || true
"$venv/bin/nodeagent" --version

# --- config: the base config with the images list, validated by the installed nodeagent ---------
"$venv/bin/python" - "$config" "$images" "$work/config.yaml" <<'PY' || die "cannot merge the config"
import sys, yaml
base_path, images_path, out = sys.argv[1:4]
with open(base_path) as f:
    base = yaml.safe_load(f) or {}
with open(images_path) as f:
    images = yaml.safe_load(f) or {}
if not isinstance(base, dict):
    sys.exit(f"{base_path}: top level must be a mapping")
if not isinstance(images, dict) or not isinstance(images.get("images"), dict):
    sys.exit(f"{images_path}: images: must be a mapping (prefetch:, protect:)")
base["images"] = images["images"]
names = " and ".join(p.rsplit("/", 1)[-1] for p in (base_path, images_path))
with open(out, "w") as f:
    f.write(f"# Written by ami/install.sh from {names}\n")
    yaml.safe_dump(base, f, sort_keys=False, default_flow_style=False)
PY
"$venv/bin/python" - "$work/config.yaml" <<'PY' || die "merged config is invalid (see above)"
import sys
from pathlib import Path
from nodeagent.config import ConfigError, load
try:
    load(Path(sys.argv[1]))
except ConfigError as e:
    for p in e.problems:
        print(f"config.yaml: {p}", file=sys.stderr)
    sys.exit(1)
PY

# --- from here on, write -------------------------------------------------------------------------
trap 'rm -rf "$work"' EXIT
rm -rf "$venv.previous"
etc="$r/etc/nodeagent"
install -d -m 0755 "$etc"
install -m 0644 "$work/config.yaml" "$etc/.config.yaml.new"
mv -f "$etc/.config.yaml.new" "$etc/config.yaml"
install -m 0644 "$images" "$etc/images.yaml"

# --- systemd units -------------------------------------------------------------------------------
sd="$r/etc/systemd/system"
install -d -m 0755 "$sd" "$sd/kubelet.service.d" "$sd/multi-user.target.wants" "$sd/sockets.target.wants"
for u in nodeagent-apply.service nodeagent-prefetch.service nodeagent.service nodeagent.socket; do
  install -m 0644 "$units/$u" "$sd/$u"
done
install -m 0644 "$units/kubelet.service.d/10-nodeagent.conf" "$sd/kubelet.service.d/10-nodeagent.conf"
# What `systemctl enable` does for WantedBy=multi-user.target (and sockets.target for the proxy's
# socket); nodeagent-prefetch.service has no [Install] section: only the kubelet drop-in pulls it in.
for u in nodeagent-apply.service nodeagent.service; do
  ln -sfn "/etc/systemd/system/$u" "$sd/multi-user.target.wants/$u"
done
ln -sfn /etc/systemd/system/nodeagent.socket "$sd/sockets.target.wants/nodeagent.socket"
if [ -z "$r" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
echo "install.sh: installed nodeagent into $root"
