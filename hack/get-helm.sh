#!/usr/bin/env bash
# Prints the path of a helm binary, building it first if it is not cached.
#
# Helm's release binaries cannot be downloaded on our machines, but its source is a Go module:
# `go install helm.sh/helm/v3/cmd/helm@vX` builds it from the Go module proxy (helm's go.mod has
# no replace directives, so this works as is). The binary is cached by version under
# ${BEAM_CACHE:-~/.cache/beam-backfill}/bin/helm-<version>/helm; the first build takes about
# 3 minutes on 2 cores, later calls return at once. Progress goes to stderr, the path to stdout:
#   HELM="$(hack/get-helm.sh)"
# An existing helm of the same version on PATH is not used: tests must run the pinned one.
set -euo pipefail

HELM_VERSION="${HELM_VERSION:-v3.22.0}"
CACHE="${BEAM_CACHE:-$HOME/.cache/beam-backfill}"
DIR="$CACHE/bin/helm-$HELM_VERSION"
PATH="$PATH:/usr/local/go/bin"

log() { printf '[get-helm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -x "$DIR/helm" ]]; then
  echo "$DIR/helm"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  log "Go is needed to build helm $HELM_VERSION (install Go >= 1.24, e.g. from go.dev or apt's golang)"
  exit 1
fi

mkdir -p "$CACHE/bin"
# Two test sessions starting at once must not both build into the same place.
exec 9>"$CACHE/bin/.helm-$HELM_VERSION.lock"
flock 9
if [[ -x "$DIR/helm" ]]; then
  echo "$DIR/helm"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "building helm $HELM_VERSION from the Go module proxy with $(go version | awk '{print $3}') (first time: about 3 minutes)"
start=$SECONDS
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0
# Helm's Makefile stamps, besides its own version, the Kubernetes version that `helm template`
# and `helm lint` assume: the minor of the client-go it is built with. Without it they assume
# v1.20 and refuse any chart whose kubeVersion asks for more.
gomod="$(go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",*$/\1/p')"
k8s_minor="$(sed -n 's/^[[:space:]]*k8s\.io\/client-go v0\.\([0-9]*\)\..*/\1/p' "$gomod" | head -n1)"
if [[ -z "$k8s_minor" ]]; then
  log "cannot find k8s.io/client-go in $gomod"; exit 1
fi
ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
  ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$k8s_minor"
done
GOBIN="$work/bin" go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
"$work/bin/helm" version --short >&2
mkdir -p "$DIR.tmp"
mv "$work/bin/helm" "$DIR.tmp/helm"
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
log "helm $HELM_VERSION ready in $DIR after $((SECONDS - start))s"
echo "$DIR/helm"
