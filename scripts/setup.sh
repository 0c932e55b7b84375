#!/usr/bin/env bash
# Install everything nodeagent's demo and tests need on a Debian 12 machine (idempotent).
# System packages: the real components the integration tests run (containerd, the distribution
# registry, crun, Prometheus/promtool, Packer, shellcheck, ...). Python: a venv in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(containerd docker-registry skopeo crun busybox-static packer prometheus shellcheck
              apache2-utils iproute2 util-linux mount e2fsprogs procps systemd python3 python3-venv python3-pip
              openssl gcc libc6-dev zlib1g-dev)  # gcc + zlib headers: soci-snapshotter (cgo)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install ${missing[*]} (sudo bash scripts/setup.sh)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  # Debian starts packaged daemons (containerd, docker-registry, prometheus) on install. The tests
  # and the demo run private instances instead, so keep them from starting at all: invoke-rc.d and
  # deb-systemd-invoke both honour policy-rc.d (exit 101 = "action forbidden").
  own_policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    own_policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$own_policy"
    chmod 755 "$own_policy"
    trap 'rm -f "$own_policy"' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ -n "$own_policy" ]; then rm -f "$own_policy"; trap - EXIT; fi
  # If a daemon we just installed still got started (policy-rc.d was someone else's and allowed it),
  # stop it through its init system. Services that were installed before are left alone.
  for svc in containerd docker-registry prometheus prometheus-node-exporter; do
    case " ${missing[*]} " in *" ${svc} "*) ;; *) continue ;; esac
    if [ -d /run/systemd/system ] && systemctl is-active --quiet "$svc" 2>/dev/null; then
      systemctl stop "$svc" || true
    elif [ -x "/etc/init.d/$svc" ]; then
      "/etc/init.d/$svc" stop >/dev/null 2>&1 || true
    fi
  done
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's chatter (index warnings, build back-end notices) goes to a log; shown only when pip fails.
pip_quiet() {
  local log=.venv/pip.log
  if ! .venv/bin/python -m pip install -q "$@" >"$log" 2>&1; then
    cat "$log" >&2
    echo "setup: pip install $* failed (log above, also in $log)" >&2
    return 1
  fi
}
# Reinstall only when the package definition changed (the install is editable: code changes need none).
stamp=.venv/.nodeagent-setup
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing nodeagent and its dev dependencies into .venv"
  pip_quiet --upgrade pip
  pip_quiet -e '.[dev]'
  echo "$want" >"$stamp"
fi

# Test binaries: pinned upstream programs built from their Go modules (crictl, containerd 2.x twice,
# kubelet, kube-apiserver, kube-scheduler, etcd, nodeadm, soci-snapshotter; tests/sandbox/testbins.py has the pins). They are cached
# outside the repo in ${NODEAGENT_TESTBIN_CACHE:-/var/cache/nodeagent-testbin}, shared by every
# checkout, built only when missing (a lock makes a second setup wait for the first).
if ! command -v go >/dev/null 2>&1 && [ -x /usr/local/go/bin/go ]; then
  export PATH="/usr/local/go/bin:$PATH"
fi
if ! command -v go >/dev/null 2>&1; then
  echo "setup: the go command (Go 1.26 or newer) is needed to build the test binaries" >&2
  exit 1
fi
.venv/bin/python -m tests.sandbox.testbins build  # one line per binary, then the total time
