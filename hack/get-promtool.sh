#!/usr/bin/env bash
# Prints the path of a promtool binary, building it first if it is not cached.
#
# Prometheus' release binaries cannot be downloaded on our machines, but its source is a Go module:
# github.com/prometheus/prometheus, whose versions on the Go module proxy are tagged v0.3XX.Y for
# Prometheus 3.XX.Y (v0.316.0 is Prometheus 3.16.0). Its go.mod has no replace directives, so
# `go install github.com/prometheus/prometheus/cmd/promtool@v0.3XX.Y` builds it as is. The binary
# is cached by version under ${BEAM_CACHE:-~/.cache/beam-backfill}/bin/promtool-<version>/promtool;
# the first build takes about 5 minutes on 2 cores, later calls return at once. Progress goes to
# stderr, the path to stdout:
#   PROMTOOL="$(hack/get-promtool.sh)"
#   "$PROMTOOL" check rules rules.yaml && "$PROMTOOL" test rules tests.yaml
# PROMTOOL_VERSION is the module version (v0.3XX.Y), not the Prometheus one (3.XX.Y).
# An existing promtool of the same version on PATH is not used: tests must run the pinned one.
set -euo pipefail

PROMTOOL_VERSION="${PROMTOOL_VERSION:-v0.316.0}"
CACHE="${BEAM_CACHE:-$HOME/.cache/beam-backfill}"
DIR="$CACHE/bin/promtool-$PROMTOOL_VERSION"
PATH="$PATH:/usr/local/go/bin"

log() { printf '[get-promtool %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

if [[ -x "$DIR/promtool" ]]; then
  echo "$DIR/promtool"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  log "Go is needed to build promtool $PROMTOOL_VERSION (install Go >= 1.26.7, e.g. from go.dev or apt's golang)"
  exit 1
fi

mkdir -p "$CACHE/bin"
# Two test sessions starting at once must not both build into the same place.
exec 9>"$CACHE/bin/.promtool-$PROMTOOL_VERSION.lock"
flock 9
if [[ -x "$DIR/promtool" ]]; then
  echo "$DIR/promtool"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
log "building promtool $PROMTOOL_VERSION from the Go module proxy with $(go version | awk '{print $3}') (first time: about 5 minutes)"
start=$SECONDS
export GOFLAGS="${GOFLAGS:--buildvcs=false}" CGO_ENABLED=0
# Prometheus' .promu.yml stamps the version into github.com/prometheus/common/version, which
# `promtool --version` prints; without it the version there is empty.
# The module's VERSION file holds the Prometheus version (3.16.0 for v0.316.0). The git revision
# is not in the module, so it stays "unknown".
moddir="$(go mod download -json "github.com/prometheus/prometheus@$PROMTOOL_VERSION" | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",*$/\1/p')"
prom_version="$(cat "$moddir/VERSION" 2>/dev/null || true)"
if [[ -z "$prom_version" ]]; then
  log "cannot read the Prometheus version from $moddir/VERSION"; exit 1
fi
v=github.com/prometheus/common/version
ld="-s -w -X $v.Version=$prom_version -X $v.Branch=HEAD -X $v.BuildUser=beam-backfill"
ld+=" -X $v.BuildDate=$(date -u +%Y%m%d-%H:%M:%S)"
# netgo as in .promu.yml; its other tag, builtinassets, only matters for the web UI, which
# promtool does not import.
GOBIN="$work/bin" go install -trimpath -tags netgo -ldflags "$ld" \
  "github.com/prometheus/prometheus/cmd/promtool@$PROMTOOL_VERSION"
"$work/bin/promtool" --version >&2
mkdir -p "$DIR.tmp"
mv "$work/bin/promtool" "$DIR.tmp/promtool"
rm -rf "$DIR"
mv "$DIR.tmp" "$DIR"
log "promtool $PROMTOOL_VERSION (Prometheus $prom_version) ready in $DIR after $((SECONDS - start))s"
echo "$DIR/promtool"
