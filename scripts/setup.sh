#!/usr/bin/env bash
# One-time (and idempotent) node set-up for meshcni on Debian 12: the Debian packages that serve as real
# parts (bcc, reference CNI plugins, iptables and conntrack-tools, HAProxy, nginx, wrk, bpftool), the
# kernel-header link bcc needs on kernels without a headers package, bpffs, and a venv from the system
# Python that can import bcc.
# Safe to run any number of times; each step checks before it acts.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MESHCNI_VENV:-$ROOT/.venv}"
APT_PACKAGES=(python3-bpfcc bpfcc-tools linux-headers-amd64 containernetworking-plugins iptables haproxy
              conntrack nginx-light wrk bpftool python3-venv python3-dev psmisc iproute2 curl linux-perf)

log() { printf '[setup] %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  echo "setup.sh must run as root (it installs packages and loads BPF programs)" >&2
  exit 1
fi

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nginx-light's package starts a host nginx on :80; meshcni only runs nginx inside lab pods.
if systemctl is-active --quiet nginx 2>/dev/null; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
if systemctl is-active --quiet haproxy 2>/dev/null; then systemctl disable --now haproxy >/dev/null 2>&1 || true; fi

# bcc compiles at load time against /lib/modules/$(uname -r)/build. Kernels without their own headers
# package work with Debian's generic headers because the programs only use UAPI structures.
KMOD="/lib/modules/$(uname -r)"
if [ ! -e "$KMOD/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -z "$hdr" ] || [ -z "$common" ]; then
    echo "no Debian kernel headers under /usr/src; install linux-headers-amd64" >&2
    exit 1
  fi
  log "linking $KMOD/build -> $hdr"
  mkdir -p "$KMOD"
  ln -sfn "$hdr" "$KMOD/build"
  ln -sfn "$common" "$KMOD/source"
fi

mountpoint -q /sys/fs/bpf || { log "mounting bpffs"; mount -t bpf bpf /sys/fs/bpf; }

if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import bcc' 2>/dev/null; then
  log "creating venv $VENV"
  /usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.meshcni-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  log "installing meshcni into $VENV"
  "$VENV/bin/pip" install -q --upgrade pip >/dev/null
  "$VENV/bin/pip" install -q -e "$ROOT[test]"
  touch "$stamp"
fi
log "ready: $VENV/bin/meshcni"
