#!/usr/bin/env bash
# Remove build leftovers from the node image before Packer snapshots it (last provisioner).
#
#   ami/cleanup.sh [--root DIR] [--build-dir DIR]
#
# Removes: nodeagent's machine-specific state (/var/lib/nodeagent, /run/nodeagent), the uploaded
# build files (--build-dir, default /tmp/nodeagent-build), pip/dnf caches, logs and journals written
# during the build, cloud-init's per-instance state, SSH host keys and the machine id (emptied, so
# systemd makes a new one at first boot).
# Keeps: the images in containerd (/var/lib/containerd), /etc/nodeagent (config and the baked-images
# manifest), /opt/nodeagent.
set -euo pipefail

root=/
build_dir=/tmp/nodeagent-build

usage() { sed -n '2,12p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --root) root=${2:?--root needs a directory}; shift 2 ;;
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "cleanup.sh: unknown argument: $1" >&2; usage 2 ;;
  esac
done
[ -d "$root" ] || { echo "cleanup.sh: $root: root directory does not exist" >&2; exit 1; }
case "$build_dir" in
  /tmp/?*|/var/tmp/?*) ;;
  *) echo "cleanup.sh: --build-dir must be under /tmp or /var/tmp: $build_dir" >&2; exit 1 ;;
esac
root=$(cd "$root" && pwd)
r=${root%/}

# Remove what matches; globs that match nothing stay literal and are skipped.
remove() {
  local p
  for p in "$@"; do
    if [ -e "$p" ] || [ -L "$p" ]; then
      rm -rf -- "$p"
      echo "cleanup.sh: removed ${p#"$r"}"
    fi
  done
}

# Flush what containerd wrote, so the snapshot holds the baked images whole.
if [ -z "$r" ]; then sync; fi

# nodeagent: state of this build instance (last-used times, apply report, daemon status).
remove "$r"/var/lib/nodeagent/* "$r"/run/nodeagent
# What Packer uploaded.
remove "$r$build_dir"
# Caches.
remove "$r"/root/.cache/pip "$r"/var/cache/dnf/* "$r"/opt/nodeagent/.cache
# Logs and journals of the build instance.
remove "$r"/var/log/journal/* "$r"/var/log/cloud-init.log "$r"/var/log/cloud-init-output.log \
       "$r"/var/log/nodeagent* "$r"/root/.bash_history "$r"/home/*/.bash_history
# Per-instance identity: cloud-init's instance state, SSH host keys, machine id.
remove "$r"/var/lib/cloud/instances/* "$r"/var/lib/cloud/instance "$r"/var/lib/cloud/data/* \
       "$r"/etc/ssh/ssh_host_*
if [ -f "$r/etc/machine-id" ]; then
  : > "$r/etc/machine-id"
  echo "cleanup.sh: emptied /etc/machine-id"
fi

for keep in /etc/nodeagent/baked-images.json /var/lib/containerd; do
  if [ -e "$r$keep" ]; then echo "cleanup.sh: kept $keep"; fi
done
