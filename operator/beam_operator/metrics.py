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

# Per destination type (kafka, webhook, nats, sns): a bounded label, never a backfill or topic.
CHUNKS_DELIVERED = Counter(
    "beam_chunks_delivered_total",
    "Chunks delivered, counted once per destination of that type as transport Jobs complete indexes",
    ["destination_type"],
)
ROWS_DELIVERED = Counter(
    "beam_rows_delivered_total",
    "Rows delivered, by destination type: what a completed transport Job's workers reported",
    ["destination_type"],
)
BYTES_DELIVERED = Counter(
    "beam_bytes_delivered_total",
    "Bytes delivered (serialized messages), by destination type, from a completed transport Job's workers",
    ["destination_type"],
)
CHUNK_SECONDS = Histogram(
    "beam_chunk_delivery_duration_seconds",
    "Time a worker took to deliver one chunk to one destination, by destination type",
    ["destination_type"],
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
)


class ControllerState(Collector):
    """Queue depth, chunks left, and the longest time any running backfill has gone without progress, read
    from the controller when scraped (one number each: no label per backfill)."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, float]] | None = None

    def collect(self):
        state = self.source() if self.source else {}
        yield GaugeMetricFamily(
            "beam_work_queue_depth", "Backfills waiting for a reconcile worker", value=state.get("queue_depth", 0)
        )
        yield GaugeMetricFamily(
            "beam_chunks_left",
            "Chunks still to deliver, summed over transporting backfills",
            value=state.get("chunks_left", 0),
        )
        yield GaugeMetricFamily(
            "beam_backfill_seconds_since_progress_max",
            "The longest any staging or transporting, not suspended backfill has gone without a status change "
            "or a chunk delivered (0 when none runs)",
            value=state.get("seconds_since_progress_max", 0),
        )


CONTROLLER = ControllerState()
REGISTRY.register(CONTROLLER)
