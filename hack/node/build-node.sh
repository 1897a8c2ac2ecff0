#!/usr/bin/env bash
# Builds the node's Kubernetes binaries, kubelet, kube-proxy and kube-scheduler, from the Go
# module proxy and caches them next to the control plane's in
# ~/.cache/beam-backfill/bin/kubernetes-$K8S_VERSION/. Same approach as
# hack/build-control-plane.sh: `go install k8s.io/kubernetes/cmd/...@vX` fails because the main
# module replaces its staging modules with local paths, so a throwaway wrapper module pins each
# staging module to its published v0.X.Y. Idempotent: skips binaries already there.
#
#   build-node.sh            all three
#   build-node.sh kubelet    only the named ones (kubelet kube-proxy kube-scheduler)
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.34.4}"
CACHE="${BEAM_CACHE:-$HOME/.cache/beam-backfill}"
K8S_DIR="$CACHE/bin/kubernetes-$K8S_VERSION"
export GOFLAGS="${GOFLAGS:--buildvcs=false}"
# Static binaries; the kubelet's cgo-only bits (none needed here) stay out.
export CGO_ENABLED=0
PATH="$PATH:/usr/local/go/bin"
ALL=(kubelet kube-proxy kube-scheduler)

log() { printf '[build-node %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if ! command -v go >/dev/null; then
  log "no Go toolchain on PATH or in /usr/local/go/bin: install Go >= 1.24 (https://go.dev/dl/) and rerun"
  exit 1
fi

wanted=("$@")
((${#wanted[@]})) || wanted=("${ALL[@]}")
for c in "${wanted[@]}"; do
  [[ " ${ALL[*]} " == *" $c "* ]] || { echo "usage: $0 [${ALL[*]}]..." >&2; exit 2; }
done

mkdir -p "$CACHE/bin"
# Shares the control plane build's lock: two Kubernetes builds at once on 2 cores only slow both,
# and both write into $K8S_DIR.
exec 9>"$CACHE/bin/.build-control-plane.lock"
flock 9

missing=()
for c in "${wanted[@]}"; do [[ -x "$K8S_DIR/$c" ]] || missing+=("$c"); done
if ((${#missing[@]} == 0)); then
  log "${wanted[*]} $K8S_VERSION cached in $K8S_DIR"
  exit 0
fi

work="$(mktemp -d)"; trap 'rm -rf "$work"' EXIT
minor="v0.${K8S_VERSION#v1.}"
log "kubernetes $K8S_VERSION: resolving staging modules (pinned to $minor)"
go mod download -json "k8s.io/kubernetes@$K8S_VERSION" >"$work/dl.json"
gomod="$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["GoMod"])' "$work/dl.json")"
staging="$(grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$gomod" | awk '{print $1}')"
{
  echo "module beam-backfill/k8s-node-build"
  echo "go 1.24.0"
  echo "require k8s.io/kubernetes $K8S_VERSION"
  for m in $staging; do echo "replace $m => $m $minor"; done
} >"$work/go.mod"
{
  printf 'package main\nimport (\n'
  for c in "${missing[@]}"; do printf ' _ "k8s.io/kubernetes/cmd/%s/app"\n' "$c"; done
  printf ')\nfunc main() {}\n'
} >"$work/tools.go"
log "downloading modules (cached after the control plane build)"
if ! (cd "$work" && go mod tidy >/dev/null 2>&1); then (cd "$work" && go mod tidy); fi

minor_num="$(echo "$K8S_VERSION" | cut -d. -f2)"
ld="-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor_num -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
mkdir -p "$K8S_DIR"
for c in "${missing[@]}"; do
  t0=$(date +%s)
  log "compiling $c (empty Go build cache: kubelet about 4 minutes on 2 cores; warm: seconds)"
  (cd "$work" && go build -trimpath -ldflags "$ld" -o "$K8S_DIR/.$c.tmp" "k8s.io/kubernetes/cmd/$c")
  mv "$K8S_DIR/.$c.tmp" "$K8S_DIR/$c"
  log "$c ready in $(( $(date +%s) - t0 ))s: $("$K8S_DIR/$c" --version 2>/dev/null || echo '?')"
done
log "kubernetes $K8S_VERSION node binaries ready in $K8S_DIR"
