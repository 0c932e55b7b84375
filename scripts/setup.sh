#!/usr/bin/env bash
# Install everything nodeagent's demo and tests need on a Debian 12 machine (idempotent).
# System packages: the real components the integration tests run (containerd, the distribution
# registry, crun, Prometheus/promtool, Packer, shellcheck, ...). Python: a venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(containerd docker-registry skopeo crun busybox-static packer prometheus shellcheck
              apache2-utils iproute2 util-linux e2fsprogs systemd python3 python3-venv python3-pip)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# Debian starts the packaged daemons; the tests run their own private instances instead.
for svc in containerd docker-registry prometheus; do
  if command -v systemctl >/dev/null && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e '.[dev]'
