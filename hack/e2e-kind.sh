#!/usr/bin/env bash
# End to end on a kind cluster, for machines with Docker (our CI has none: it runs the same chart
# and images on the stack's own node, tests/node and tests/e2e).
#
#   hack/e2e-kind.sh                     # the images the stack's node runs (buildah, Debian base)
#   E2E_IMAGES=docker hack/e2e-kind.sh   # docker build with the public python images instead
#
# Gets the images, creates a kind cluster, loads the images, installs the chart, applies
# examples/seed-usdc-base.yaml and waits until that backfill is completed (fails at once if it
# fails). The backfill reads a real Snowflake and stages to a real GCS bucket, so it needs:
#   SNOWFLAKE_ACCOUNT, SNOWFLAKE_USER, SNOWFLAKE_PASSWORD   (and optionally SNOWFLAKE_WAREHOUSE,
#       SNOWFLAKE_ROLE, SNOWFLAKE_DATABASE, SNOWFLAKE_SCHEMA, SNOWFLAKE_HOST, SNOWFLAKE_PORT,
#       SNOWFLAKE_PROTOCOL): become the Secret beam-snowflake in the example's namespace
#   E2E_VALUES   a values file for the chart with at least config.staging_bucket and
#       config.managed_kafka_bootstrap (the example writes to the operator's managed Kafka), and
#       whatever else your setup needs (config.unload_stage, config.gcs_endpoint, ...)
# Other knobs: E2E_NAMESPACE, the organization the example goes to when it names none (default
# org-e2e); KIND_CLUSTER (default beam-backfill-e2e); E2E_TIMEOUT seconds (default 1800);
# KEEP_CLUSTER=1 to leave the cluster running afterwards.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLUSTER="${KIND_CLUSTER:-beam-backfill-e2e}"
TAG="${E2E_TAG:-e2e}"
IMAGES="${E2E_IMAGES:-stack}"
TIMEOUT="${E2E_TIMEOUT:-1800}"
EXAMPLE="$ROOT/examples/seed-usdc-base.yaml"
RELEASE=beam-backfill
OPERATOR_NS=beam-system
KUBECTL=(kubectl --context "kind-$CLUSTER")

log() { printf '[e2e-kind %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "$*"; exit 1; }

for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is required (this script is for machines with Docker)"
done
[[ -f "$EXAMPLE" ]] || die "$EXAMPLE not found"
[[ -n "${SNOWFLAKE_ACCOUNT:-}" && -n "${SNOWFLAKE_USER:-}" && -n "${SNOWFLAKE_PASSWORD:-}" ]] \
  || die "set SNOWFLAKE_ACCOUNT, SNOWFLAKE_USER and SNOWFLAKE_PASSWORD (see the header of $0)"
[[ -n "${E2E_VALUES:-}" && -f "${E2E_VALUES}" ]] || die "set E2E_VALUES to a values file with config.staging_bucket"
HELM="$("$ROOT/hack/get-helm.sh")"

cleanup() {
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    log "failed; operator log and backfill state follow"
    "${KUBECTL[@]}" -n "$OPERATOR_NS" logs "deploy/$RELEASE" --tail=100 >&2 || true
    "${KUBECTL[@]}" get beambackfills -A -o wide >&2 || true
    "${KUBECTL[@]}" -n "${ns:-default}" get jobs,pods >&2 || true
  fi
  if [[ "${KEEP_CLUSTER:-0}" != 1 ]]; then
    log "deleting kind cluster $CLUSTER (KEEP_CLUSTER=1 keeps it)"
    kind delete cluster --name "$CLUSTER" >/dev/null 2>&1 || true
  fi
  exit "$rc"
}
trap cleanup EXIT

if ! kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  log "creating kind cluster $CLUSTER"
  kind create cluster --name "$CLUSTER" --wait 120s
fi
declare -A tags=([beam-backfill/operator]="$TAG" [beam-backfill/jobrunner]="$TAG")
case "$IMAGES" in
  stack)
    # The OCI archives the stack's node imports (beam_devstack.images: Dockerfile.* built with
    # buildah on a Debian Python 3.11 base, tagged dev-<hash of their inputs>), built if stale.
    [[ -x "$ROOT/.venv/bin/beam-dev" ]] || "$ROOT/hack/setup"
    while read -r repository tag archive; do
      tags[$repository]="$tag"
      log "loading $repository:$tag into $CLUSTER from $archive"
      kind load image-archive --name "$CLUSTER" "$archive"
    done < <("$ROOT/.venv/bin/beam-dev" images)
    ;;
  docker)
    log "building images beam-backfill/operator:$TAG and beam-backfill/jobrunner:$TAG"
    docker build -f "$ROOT/Dockerfile.operator" -t "beam-backfill/operator:$TAG" "$ROOT"
    docker build -f "$ROOT/Dockerfile.jobrunner" -t "beam-backfill/jobrunner:$TAG" "$ROOT"
    log "loading images into $CLUSTER"
    kind load docker-image --name "$CLUSTER" "beam-backfill/operator:$TAG" "beam-backfill/jobrunner:$TAG"
    ;;
  *) die "E2E_IMAGES is stack or docker, not $IMAGES" ;;
esac

# The example names its namespace (its organization); the worker ServiceAccount and the
# Snowflake Secret must live there.
# Read before the CRD exists (kubectl cannot map the kind yet): the first metadata block's
# two-space-indented name and namespace.
meta() { awk -v key="$1" '/^metadata:/ {m=1; next} m && /^[^ #]/ {exit} m && $1 == key":" {print $2; exit}' "$EXAMPLE" | tr -d "\"'"; }
name="$(meta name)"
ns="$(meta namespace)"
ns="${ns:-${E2E_NAMESPACE:-org-e2e}}"
[[ -n "$name" ]] || die "no metadata.name in $EXAMPLE"
"${KUBECTL[@]}" create namespace "$ns" --dry-run=client -o yaml | "${KUBECTL[@]}" apply -f -

log "installing the chart (operator in $OPERATOR_NS, organization namespace $ns)"
"$HELM" upgrade --install "$RELEASE" "$ROOT/charts/beam-backfill" \
  --kube-context "kind-$CLUSTER" --namespace "$OPERATOR_NS" --create-namespace \
  --values "$E2E_VALUES" \
  --set "operator.image.tag=${tags[beam-backfill/operator]}" --set "jobrunner.image.tag=${tags[beam-backfill/jobrunner]}" \
  --set operator.image.pullPolicy=Never --set jobrunner.image.pullPolicy=Never \
  --set-json "worker.serviceAccount.namespaces=[\"$ns\"]" \
  --wait --timeout 5m

secret_args=()
for key in account user password warehouse role database schema host port protocol; do
  var="SNOWFLAKE_${key^^}"
  if [[ -n "${!var:-}" ]]; then secret_args+=("--from-literal=$key=${!var}"); fi
done
"${KUBECTL[@]}" -n "$ns" create secret generic beam-snowflake "${secret_args[@]}" --dry-run=client -o yaml \
  | "${KUBECTL[@]}" apply -f - >/dev/null

log "applying $EXAMPLE ($ns/$name)"
"${KUBECTL[@]}" -n "$ns" apply -f "$EXAMPLE"

deadline=$((SECONDS + TIMEOUT))
last=""
while :; do
  status="$("${KUBECTL[@]}" -n "$ns" get beambackfill "$name" -o jsonpath='{.status.status} {.status.chunks_left}/{.status.num_chunks}')"
  if [[ "$status" != "$last" ]]; then log "status: $status"; last="$status"; fi
  case "$status" in
    completed*) break ;;
    failed* | cancelled*)
      die "backfill ended $status: $("${KUBECTL[@]}" -n "$ns" get beambackfill "$name" -o jsonpath='{.status.error_message}')" ;;
  esac
  ((SECONDS < deadline)) || die "not completed after ${TIMEOUT}s"
  sleep 5
done
log "backfill $ns/$name completed: $("${KUBECTL[@]}" -n "$ns" get beambackfill "$name" -o jsonpath='{.status.num_rows}') rows"
