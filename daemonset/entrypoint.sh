#!/bin/sh
# The meshcni image's entrypoint: `meshcni "$@"`, after making the kernel headers findable for bcc.
# bcc compiles against /lib/modules/$(uname -r)/build. In a container, uname -r is the HOST's kernel while
# /lib/modules is the image's, which only has Debian's headers package: link the host kernel's name to
# those headers (the programs use UAPI structures only, as on a host without its own headers package).
# The link lives in the container's filesystem; nothing on the host is touched. Only the agent compiles BPF
# (install-cni runs with a read-only root filesystem and needs no headers).
set -eu
kmod="/lib/modules/$(uname -r)"
if [ "${1:-}" = agent ] && [ ! -e "$kmod/build/include" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n 1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n 1)
  if [ -n "$hdr" ] && [ -n "$common" ]; then
    mkdir -p "$kmod"
    ln -sfn "$hdr" "$kmod/build"
    ln -sfn "$common" "$kmod/source"
  fi
fi
exec meshcni "$@"
