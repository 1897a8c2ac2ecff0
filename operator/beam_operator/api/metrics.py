"""Prometheus metrics of the REST API (served at /metrics, without a key, like /healthz)."""

from prometheus_client import Histogram

REQUEST_SECONDS = Histogram(
    "beam_api_request_duration_seconds",
    "REST API requests, by route template, method and status code",
    ["route", "method", "code"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
