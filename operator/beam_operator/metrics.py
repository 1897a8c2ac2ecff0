"""Prometheus metrics of the operator (served on BEAM_METRICS_PORT)."""

from collections.abc import Callable

from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class BackfillsByStatus(Collector):
    """beam_backfills{status}: counted from the controller's cache when scraped.

    Counting on every watch event cost O(backfills) per event; a scrape every 15 s costs the
    same once. Every status is reported, 0 included, so a drained phase does not linger.
    """

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, int]] | None = None

    def collect(self):
        g = GaugeMetricFamily("beam_backfills", "BeamBackfills known to the operator, by status", labels=["status"])
        for status, n in sorted((self.source() if self.source else {}).items()):
            g.add_metric([status], n)
        yield g


BACKFILLS = BackfillsByStatus()
REGISTRY.register(BACKFILLS)
TRANSITIONS = Counter("beam_backfill_transitions_total", "Status transitions, by the status entered", ["to"])
RECONCILE_ERRORS = Counter("beam_reconcile_errors_total", "Reconciles that raised and were retried")
RECONCILE_SECONDS = Histogram(
    "beam_reconcile_duration_seconds",
    "Time to reconcile one backfill, API calls included",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STATUS_WRITES = Counter("beam_status_writes_total", "Status patches written")
API_WRITES = Counter("beam_api_writes_total", "Other API writes, by kind", ["kind"])
EVENTS_DROPPED = Counter(
    "beam_events_dropped_total",
    "Events not recorded because their lane's queue was full (the apiserver too slow to take them)",
)
