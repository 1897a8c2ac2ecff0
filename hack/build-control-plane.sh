#!/usr/bin/env bash
# Builds etcd, kube-apiserver and kube-controller-manager from the Go module proxy and caches
# them by version under ~/.cache/beam-backfill/bin. No release binaries can be downloaded on
# these machines, and `go install k8s.io/kubernetes/cmd/...@vX` fails because the main module
# replaces its staging modules with local paths; a throwaway wrapper module pins each staging
# module to its published v0.X.Y instead.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.4}"
CACHE="${BEAM_CACHE:-$HOME/.cache/beam-backfill}"
K8S_DIR="$CACHE/bin/kubernetes-$K8S_VERSION"
ETCD_DIR="$CACHE/bin/etcd-$ETCD_VERSION"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0
PATH="$PATH:/usr/local/go/bin"

log() { printf '[build-control-plane %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v go >/dev/null; then
  log "no Go toolchain on PATH or in /usr/local/go/bin: install Go >= 1.24 (https://go.dev/dl/) and rerun"
  exit 1
fi

build_k8s() {
  if [[ -x "$K8S_DIR/kube-apiserver" && -x "$K8S_DIR/kube-controller-manager" ]]; then
    log "kubernetes $K8S_VERSION cached in $K8S_DIR"; return
  fi
  local work staging minor
  work="$(mktemp -d)"; trap 'rm -rf "$work"' RETURN
  minor="v0.${K8S_VERSION#v1.}"
  log "kubernetes $K8S_VERSION: resolving staging modules (pinned to $minor)"
  go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >"$work/dl.json"
  local gomod
  gomod="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' "$work/dl.json")"
  staging="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}')"
  {
    echo "module beam-backfill/k8s-build"
    echo "go 1.24.0"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    for m in $staging; do echo "replace $m => $m $minor"; done
  } >"$work/go.mod"
  printf 'package main\nimport (\n _ "k8s.io/kubernetes/cmd/kube-apiserver/app"\n _ "k8s.io/kubernetes/cmd/kube-controller-manager/app"\n)\nfunc main() {}\n' >"$work/tools.go"
  log "downloading modules (first time: several minutes)"
  # Quiet on success; on failure run again so the error is what the user sees.
  if ! (cd "$work" && go mod tidy >/dev/null 2>&1); then (cd "$work" && go mod tidy); fi
  mkdir -p "$K8S_DIR.tmp"
  local minor_num ld
  minor_num="$(echo "$K8S_VERSION" | cut -d. -f2)"
  ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor_num -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  for cmd in kube-apiserver kube-controller-manager; do
    log "compiling $cmd (first time: 5-15 minutes on 2 cores)"
    (cd "$work" && go build -trimpath -ldflags "$ld" -o "$K8S_DIR.tmp/$cmd" "k8s.io/kubernetes/cmd/$cmd")
  done
  # File by file: the node's binaries (hack/node/build-node.sh) live in the same directory.
  mkdir -p "$K8S_DIR"
  for f in "$K8S_DIR.tmp"/*; do mv -f "$f" "$K8S_DIR/"; done
  rmdir "$K8S_DIR.tmp"
  log "kubernetes $K8S_VERSION ready in $K8S_DIR"
}

build_etcd() {
  if [[ -x "$ETCD_DIR/etcd" ]]; then log "etcd $ETCD_VERSION cached in $ETCD_DIR"; return; fi
  local work; work="$(mktemp -d)"; trap 'rm -rf "$work"' RETURN
  log "etcd $ETCD_VERSION: building"
  cat >"$work/go.mod" <<MOD
module beam-backfill/etcd-build
go 1.24.0
require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
  printf 'package main\nimport _ "go.etcd.io/etcd/server/v3/etcdmain"\nfunc main() {}\n' >"$work/tools.go"
  if ! (cd "$work" && go mod tidy >/dev/null 2>&1); then (cd "$work" && go mod tidy); fi
  mkdir -p "$ETCD_DIR.tmp"
  (cd "$work" && go build -trimpath -ldflags "-s -w" -o "$ETCD_DIR.tmp/etcd" go.etcd.io/etcd/server/v3)
  rm -rf "$ETCD_DIR"; mv "$ETCD_DIR.tmp" "$ETCD_DIR"
  log "etcd $ETCD_VERSION ready in $ETCD_DIR"
}

# Two test sessions on a fresh machine would otherwise compile the same binaries twice.
mkdir -p "$CACHE/bin"
exec 9>"$CACHE/bin/.build-control-plane.lock"
flock 9

case "${1:-all}" in
  etcd) build_etcd ;;
  kubernetes) build_k8s ;;
  all) build_etcd; build_k8s ;;
  *) echo "usage: $0 [all|etcd|kubernetes]" >&2; exit 2 ;;
esac
