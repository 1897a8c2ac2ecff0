#!/usr/bin/env bash
# Builds the local node's images without a Docker engine or any registry pull, and hands them
# to a containerd. Each image is cached: it is rebuilt only when its inputs change (its recipe
# below and its input files, hashed into the label org.beam-backfill.inputs and into the name of
# its OCI archive under ~/.cache/beam-backfill/images/).
#
#   build-images.sh [all]                     build (or find cached) every image below
#   build-images.sh pause|python|build        one image (and the images it is built FROM)
#   build-images.sh archive NAME              print NAME's OCI archive path (builds it if needed)
#   build-images.sh import SOCKET [NAME...]   import images (default: pause python) into the
#                                             containerd at SOCKET, namespace k8s.io (the CRI's)
#   build-images.sh dockerfile FILE TAG [CONTEXT]
#                                             build a project Dockerfile (PYTHON_IMAGE/BUILD_IMAGE set
#                                             to the local bases, layer cache on) and print the path of
#                                             its OCI archive; import that with `ctr ... images import`
#
# Images:
#   pause   localhost/beam-backfill/pause:1      static /pause (pause.c): the sandbox image
#   python  localhost/python:3.11-slim-bookworm  Debian bookworm (mmdebstrap minbase) + Python 3.11,
#                                                pip, venv, python-is-python3; not EXTERNALLY-MANAGED
#   build   localhost/python:3.11-bookworm       the same + build-essential, python3-dev, git
#
# What mattered on these machines (cgroup v1 hybrid, root without CAP_SYS_RESOURCE, TLS-intercepted
# egress): buildah must use runc (crun fails on hybrid cgroups), RLIMIT_NOFILE/NPROC must be given
# explicitly (raising the defaults needs CAP_SYS_RESOURCE), RUN steps use the host network and get
# the host's CA bundle mounted read-only so that pip can verify the registry's certificate.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${BEAM_CACHE:-$HOME/.cache/beam-backfill}"
IMG_DIR="$CACHE/images"
SUITE="${BEAM_DEBIAN_SUITE:-bookworm}"
LABEL=org.beam-backfill.inputs
RUNC=/usr/sbin/runc
HOST_CA=/etc/ssl/certs/ca-certificates.crt

log() { printf '[build-images %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

declare -A REF=(
  [pause]=localhost/beam-backfill/pause:1
  [python]=localhost/python:3.11-slim-bookworm
  [build]=localhost/python:3.11-bookworm
)
# Docs, man pages and translations out, as in Debian's slim images.
SLIM_DPKG=(--dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*'
  --dpkgopt='path-include=/usr/share/doc/*/copyright' --dpkgopt='path-exclude=/usr/share/locale/*'
  --dpkgopt='path-exclude=/usr/share/info/*')
PY_PACKAGES="python3,python3-venv,python3-pip,python-is-python3,ca-certificates"
BUILD_PACKAGES="$PY_PACKAGES,build-essential,python3-dev,git"
# Drop-in for the official python:3.11 images, whose Python is not Debian's: `pip install` outside a
# venv must work (Debian marks its Python EXTERNALLY-MANAGED, PEP 668), `python` must exist.
# shellcheck disable=SC2016  # "$1" is mmdebstrap's, expanded when it runs the hook
ROOTFS_HOOK='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin "$1"/usr/lib/python3*/EXTERNALLY-MANAGED'
IMAGE_ENV=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin'
  --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]')

# The inputs of each image: its recipe (the variables above that shape it) and its files; an image
# built FROM another includes that one's hash.
inputs_hash() {
  local name=$1
  {
    echo "v1 $name ${REF[$name]}"
    case $name in
      pause) cat "$HERE/pause.c"; gcc --version | head -1 ;;
      python) echo "$SUITE $PY_PACKAGES ${SLIM_DPKG[*]} ${IMAGE_ENV[*]} $ROOTFS_HOOK" ;;
      build) echo "$SUITE $BUILD_PACKAGES ${SLIM_DPKG[*]} ${IMAGE_ENV[*]} $ROOTFS_HOOK" ;;
    esac
  } | sha256sum | cut -c1-16
}

archive_path() { echo "$IMG_DIR/$1-$(inputs_hash "$1").oci.tar"; }

cached() {  # NAME: image in podman's store with the current inputs label, and its archive on disk
  local name=$1 want got
  want="$(inputs_hash "$name")"
  got="$(podman image inspect --format "{{index .Labels \"$LABEL\"}}" "${REF[$name]}" 2>/dev/null || true)"
  [[ "$got" == "$want" && -s "$(archive_path "$name")" ]]
}

save_archive() {  # NAME: OCI archive whose index names the image ${REF[NAME]} (ctr import uses it)
  local name=$1 out tmp
  out="$(archive_path "$name")"; tmp="$out.tmp"
  rm -f "$IMG_DIR/$name"-*.oci.tar "$tmp"
  podman save -q --format oci-archive -o "$tmp" "${REF[$name]}"
  mv "$tmp" "$out"
}

debian_rootfs() {  # NAME PACKAGES -> podman image from an mmdebstrap'ed rootfs
  local name=$1 packages=$2 work
  work="$(mktemp -d "$IMG_DIR/work.XXXXXX")"
  log "$name: mmdebstrap $SUITE minbase + $packages"
  mmdebstrap --quiet --variant=minbase --include="$packages" "${SLIM_DPKG[@]}" \
    --customize-hook="$ROOTFS_HOOK" \
    "$SUITE" "$work/rootfs.tar"
  log "$name: podman import as ${REF[$name]} ($(du -h "$work/rootfs.tar" | cut -f1) tar)"
  podman import -q "${IMAGE_ENV[@]}" --change "LABEL $LABEL=$(inputs_hash "$name")" \
    "$work/rootfs.tar" "${REF[$name]}" >/dev/null
  rm -rf "$work"
}

build_pause() {
  local work; work="$(mktemp -d "$IMG_DIR/work.XXXXXX")"
  mkdir -p "$work/root"
  gcc -static -Os -s -Wall -o "$work/root/pause" "$HERE/pause.c"
  tar -C "$work/root" -cf "$work/pause.tar" pause
  podman import -q --change 'ENTRYPOINT ["/pause"]' --change "LABEL $LABEL=$(inputs_hash pause)" \
    "$work/pause.tar" "${REF[pause]}" >/dev/null
  rm -rf "$work"
}

prune_ours() {  # replaced images of ours (untagged, our label): children first, so repeat
  local -a ids
  for _ in 1 2 3; do
    mapfile -t ids < <(podman images -q --filter dangling=true --filter "label=$LABEL" 2>/dev/null | sort -u)
    ((${#ids[@]})) || return 0
    podman rmi "${ids[@]}" >/dev/null 2>&1 || true
  done
}

build_dockerfile() {  # FILE TAG [CONTEXT]
  local file=$1 tag=$2 ctx=${3:-$(dirname "$1")} out t0
  ensure python; ensure build
  t0=$(date +%s)
  log "buildah bud -f $file -t $tag $ctx"
  buildah bud --quiet --layers --runtime "$RUNC" --network host \
    --ulimit nofile=4096:4096 --ulimit nproc=4096:4096 \
    -v "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro" \
    --build-arg "PYTHON_IMAGE=${REF[python]}" --build-arg "BUILD_IMAGE=${REF[build]}" \
    -t "$tag" -f "$file" "$ctx" >/dev/null
  out="$IMG_DIR/dockerfile-$(echo "$tag" | tr '/:' '__').oci.tar"
  podman save -q --format oci-archive -o "$out.tmp" "$tag"
  mv "$out.tmp" "$out"
  log "$tag built in $(( $(date +%s) - t0 ))s -> $out"
  echo "$out"
}

ensure() {
  local name=$1 t0
  [[ -n "${REF[$name]:-}" ]] || { log "unknown image $name (known: ${!REF[*]})"; exit 2; }
  if cached "$name"; then log "$name: ${REF[$name]} cached ($(inputs_hash "$name"))"; return; fi
  t0=$(date +%s)
  case $name in
    pause) build_pause ;;
    python) debian_rootfs python "$PY_PACKAGES" ;;
    build) debian_rootfs build "$BUILD_PACKAGES" ;;
  esac
  save_archive "$name"
  prune_ours
  log "$name: ${REF[$name]} built in $(( $(date +%s) - t0 ))s -> $(archive_path "$name")"
}

import_into() {  # SOCKET NAME...: into containerd's k8s.io namespace, where the CRI plugin looks
  local sock=$1; shift
  [[ -S "$sock" ]] || { log "no containerd socket at $sock"; exit 1; }
  local name
  for name in "$@"; do
    ensure "$name"
    ctr --address "$sock" -n k8s.io images import "$(archive_path "$name")" >/dev/null
    log "$name: imported ${REF[$name]} into $sock"
  done
}

mkdir -p "$IMG_DIR"
# podman and buildah share one store: two builds at once would race on the same tags.
exec 9>"$IMG_DIR/.build-images.lock"
flock 9
rm -rf "$IMG_DIR"/work.*  # left by an interrupted build (we hold the lock: nobody else is building)

case "${1:-all}" in
  all) for n in pause python build; do ensure "$n"; done ;;
  pause|python|build) ensure "$1" ;;
  archive) [[ $# == 2 ]] || { echo "usage: $0 archive NAME" >&2; exit 2; }; ensure "$2"; archive_path "$2" ;;
  import)
    [[ $# -ge 2 ]] || { echo "usage: $0 import SOCKET [NAME...]" >&2; exit 2; }
    sock=$2; shift 2
    (($#)) || set -- pause python
    import_into "$sock" "$@" ;;
  dockerfile)
    [[ $# -ge 3 ]] || { echo "usage: $0 dockerfile FILE TAG [CONTEXT]" >&2; exit 2; }
    build_dockerfile "$2" "$3" "${4:-}" ;;
  *) echo "usage: $0 [all|pause|python|build|archive NAME|import SOCKET [NAME...]|dockerfile FILE TAG [CONTEXT]]" >&2; exit 2 ;;
esac
