"""Prometheus metrics of the operator (served on BEAM_METRICS_PORT)."""

from prometheus_client import Counter, Gauge, Histogram

BACKFILLS = Gauge("beam_backfills", "BeamBackfills known to the operator, by status", ["status"])
TRANSITIONS = Counter("beam_backfill_transitions_total", "Status transitions, by the status entered", ["to"])
RECONCILE_ERRORS = Counter("beam_reconcile_errors_total", "Reconciles that raised and were retried")
RECONCILE_SECONDS = Histogram(
    "beam_reconcile_duration_seconds", "Time to reconcile one backfill, API calls included",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STATUS_WRITES = Counter("beam_status_writes_total", "Status patches written")
API_WRITES = Counter("beam_api_writes_total", "Other API writes, by kind", ["kind"])
