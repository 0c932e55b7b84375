#!/usr/bin/env bash
# nodeagent's main job end to end against a sandbox node: real containerd, a local registry, images
# built on the spot. Installs what it needs first (scripts/setup.sh). Run as root: sudo bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
  echo "demo: needs root (it runs containerd and mounts): sudo bash scripts/demo.sh" >&2
  exit 1
fi
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
