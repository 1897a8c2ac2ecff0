#!/usr/bin/env bash
# Debian packages for a real local Kubernetes node (containerd + runc + CNI plugins + iptables)
# and for building images without a Docker engine (buildah, podman, mmdebstrap).
# Idempotent: does nothing when every package is installed. Run as root.
#
# runc is named explicitly and recommends are off so that podman's "crun | runc" dependency is
# met by runc: crun fails on these machines ("cgroups in hybrid mode not supported").
set -euo pipefail

log() { printf '[install-packages %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

PACKAGES=(
  containerd                  # CRI runtime, run as a plain process with its own config
  runc                        # OCI runtime for containerd, buildah and podman
  containernetworking-plugins # bridge, host-local, portmap, loopback in /usr/lib/cni
  iptables                    # kubelet, kube-proxy, the CNI bridge plugin and our own guard chain
  iproute2                    # ip link/addr/netns
  conntrack                   # kube-proxy flushes stale UDP conntrack entries with it
  buildah                     # Dockerfile builds (buildah bud)
  podman                      # podman import / save --format oci-archive
  mmdebstrap                  # the Debian bookworm base image with Python 3.11
  uidmap                      # newuidmap/newgidmap, which podman/buildah look for
  gcc libc6-dev               # the static pause binary
)

missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  log "all ${#PACKAGES[@]} packages installed"
else
  [[ $(id -u) == 0 ]] || { log "missing: ${missing[*]}; run as root"; exit 1; }
  log "apt-get update"
  apt-get update -qq
  log "installing: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  log "installed"
fi

if dpkg-query -W -f='${Status}\n' crun 2>/dev/null | grep -q '^install ok installed$'; then
  log "note: crun is installed; nothing here uses it (containerd, buildah and podman are pointed at /usr/sbin/runc)"
fi
for b in /usr/sbin/runc /usr/bin/containerd /usr/bin/containerd-shim-runc-v2 /usr/bin/ctr /usr/lib/cni/bridge \
         /usr/lib/cni/host-local /usr/lib/cni/loopback /usr/lib/cni/portmap /usr/sbin/iptables /usr/sbin/ip6tables \
         /usr/bin/buildah /usr/bin/podman /usr/bin/mmdebstrap; do
  [[ -x $b ]] || { log "expected $b after install; not found"; exit 1; }
done
