"""POST /backfills/preview: what a create body would stage, and how long it would take.

The counting and sampling happen in a worker Job the operator runs for a BeamPreview
(beam_contract.preview), because only workers hold the organization's Snowflake credentials.
This module asks for one and adds the one thing the worker cannot know: an estimate of the
duration, from this organization's own completed backfills.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from pydantic import BaseModel, Field

from beam_contract.model import parse_timestamp
from beam_contract.preview import PreviewColumn

# Start-up of a backfill (Jobs, Pods, connections) before rows move, whatever its size.
FIXED_SECONDS = 10.0
# Without any completed backfill of the organization: the local stack's end-to-end rate, rounded
# down (docs/benchmarks.md, "End to end: the demo").
DEFAULT_ROWS_PER_SECOND = 20_000.0
HISTORY = 20  # completed backfills the rate is taken from, newest first


class Preview(BaseModel):
    """What a backfill of this body would stage, measured before anything runs."""

    num_rows: int = Field(description="Rows the window (and filter) holds: what staging would export.")
    estimated_bytes: int = Field(description="Parquet bytes staging would write (bytes per row measured on a sample).")
    estimated_chunks: int = Field(description="Chunks staging would write, of the operator's chunk size.")
    estimated_seconds: float = Field(description="From create to completed, at this organization's past rate.")
    estimate_basis: str = Field(description="What estimated_seconds rests on.")
    columns: list[PreviewColumn] = Field(description="The columns the backfill would output, with their types.")
    sample: list[Any] = Field(
        description="The first rows in window order, each as a destination receives it (after spec.transforms: what they make of the window's first 1,000 rows)."
    )
    sample_truncated: bool = Field(description="True when rows were cut or left out to keep the answer small.")
    columns_truncated: bool = Field(description="True when columns were left out to keep the answer small.")
    preview_seconds: float = Field(description="How long the preview worker took, from its Job's creation.")


def _seconds(a: str, b: str) -> float:
    return (parse_timestamp(b) - parse_timestamp(a)).total_seconds()


def rate(backfills: Iterable[dict[str, Any]]) -> tuple[float, int]:
    """Rows per second of the newest completed backfills (beyond their fixed start-up), and how
    many there were."""
    done: list[tuple[str, int, float]] = []
    for o in backfills:
        st = o.get("status") or {}
        if st.get("status") != "completed" or not st.get("num_rows") or not st.get("time_completed"):
            continue
        start = st.get("time_created") or o["metadata"].get("creationTimestamp")
        if not start:
            continue
        done.append(
            (st["time_completed"], st["num_rows"], max(_seconds(start, st["time_completed"]) - FIXED_SECONDS, 1.0))
        )
    done = sorted(done, reverse=True)[:HISTORY]
    if not done:
        return DEFAULT_ROWS_PER_SECOND, 0
    return sum(r for _, r, _ in done) / sum(s for _, _, s in done), len(done)


def estimate(num_rows: int, backfills: Iterable[dict[str, Any]]) -> tuple[float, str]:
    per_second, n = rate(backfills)
    basis = (
        f"{per_second:,.0f} rows/s, this organization's rate over its last {n} completed backfill{'s' if n != 1 else ''}"
        if n
        else f"{per_second:,.0f} rows/s, the local stack's measured rate (no completed backfill of this organization yet)"
    )
    return round(FIXED_SECONDS + num_rows / per_second, 1), basis


def answer(status: dict[str, Any], backfills: Iterable[dict[str, Any]]) -> dict[str, Any]:
    import orjson

    seconds, basis = estimate(status.get("num_rows") or 0, backfills)
    sample = []
    for row in status.get("sample") or []:
        try:
            sample.append(orjson.loads(row))
        except orjson.JSONDecodeError:
            sample.append(row)  # a row cut to fit: shown as the text it is
    return {
        "num_rows": status.get("num_rows") or 0,
        "estimated_bytes": status.get("estimated_bytes") or 0,
        "estimated_chunks": status.get("estimated_chunks") or 0,
        "estimated_seconds": seconds,
        "estimate_basis": basis,
        "columns": status.get("columns") or [],
        "sample": sample,
        "sample_truncated": bool(status.get("sample_truncated")),
        "columns_truncated": bool(status.get("columns_truncated")),
        "preview_seconds": status.get("worker_seconds") or 0.0,
    }
