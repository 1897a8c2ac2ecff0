"""A preview: what a backfill would stage, measured before anything runs (docs/console.md).

A BeamPreview names a table, a window, an optional filter, columns and transforms, exactly as a backfill's
spec does. The operator runs it as a short Job of the jobrunner (`beam-jobrunner preview`) in
the organization's namespace, because the Snowflake credentials live there and nowhere else;
the worker answers with one line of JSON in its termination message (PreviewResult), which
the operator copies into the BeamPreview's status. The REST API creates one, waits for its
status and deletes it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from beam_contract.model import GROUP, IDENT_RE, VERSION, BackfillSpec, BackfillWindow, Filter, Transform, _Model

PREVIEW_KIND = "BeamPreview"
PREVIEW_PLURAL = "beampreviews"
PREVIEW_SINGULAR = "beampreview"
PREVIEW_SHORT_NAMES = ["bbp"]
PREVIEW_API_VERSION = f"{GROUP}/{VERSION}"

# Rows of the sample the worker returns, and rows it reads to measure parquet bytes per row.
SAMPLE_ROWS_MAX = 10
MEASURE_ROWS = 1000
# A sample row (its delivered JSON) longer than this is cut, and the result says so.
SAMPLE_ROW_MAX_CHARS = 4000

_SOURCE = BackfillSpec.model_fields


class PreviewSpec(_Model):
    """The source half of a backfill's spec: the same fields, the same rules, the same messages."""

    table: str = _SOURCE["table"]
    backfill_window: BackfillWindow = _SOURCE["backfill_window"]
    filter: Filter | None = _SOURCE["filter"]
    columns: list[Annotated[str, Field(pattern=IDENT_RE, max_length=255)]] | None = _SOURCE["columns"]
    transforms: list[Transform] | None = _SOURCE["transforms"]
    sample_rows: int = Field(default=5, ge=0, le=SAMPLE_ROWS_MAX, description="Rows of the sample to return.")

    @classmethod
    def of(cls, spec: BackfillSpec, sample_rows: int = 5) -> PreviewSpec:
        return cls(
            table=spec.table,
            backfill_window=spec.backfill_window,
            filter=spec.filter,
            columns=spec.columns,
            transforms=spec.transforms,
            sample_rows=sample_rows,
        )


class PreviewColumn(BaseModel):
    name: str
    type: str = Field(description="The column's Snowflake type, e.g. NUMBER(38,0), TEXT, TIMESTAMP_NTZ(9).")


class PreviewResult(BaseModel):
    """The preview worker's termination message on success: one line of JSON under 4096 bytes."""

    num_rows: int = Field(description="Rows the window (and filter) holds: what staging would export.")
    bytes_per_row: float = Field(
        description="Parquet bytes per row, measured by writing up to MEASURE_ROWS rows as staging writes them."
    )
    columns: list[PreviewColumn] = Field(description="The columns staging would export, in order, with their types.")
    sample_z: str = Field(
        default="",
        description="The first rows in window order, each as the message a destination receives: a JSON list, "
        "zlib-compressed, base64 (three to four times more rows fit in the kubelet's 4096 bytes).",
    )
    sample_truncated: bool = Field(
        default=False, description="True when a row was cut or rows left out to fit the termination message."
    )
    columns_truncated: bool = Field(
        default=False,
        description="True when even the columns alone did not fit the termination message (hundreds of "
        "columns): `columns` holds the first ones that fit, and the sample is empty.",
    )

    @staticmethod
    def pack(rows: list[str]) -> str:
        import base64
        import json
        import zlib

        return base64.b64encode(zlib.compress(json.dumps(rows).encode(), 9)).decode() if rows else ""

    def sample(self) -> list[str]:
        import base64
        import json
        import zlib

        return json.loads(zlib.decompress(base64.b64decode(self.sample_z))) if self.sample_z else []


class PreviewPhase(StrEnum):
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


class PreviewStatus(BaseModel):
    """What the operator reports on a BeamPreview."""

    model_config = ConfigDict(extra="ignore")
    phase: PreviewPhase | None = Field(default=None, description="running, succeeded or failed.")
    num_rows: int | None = Field(default=None, description="Rows the window (and filter) holds.")
    estimated_bytes: int | None = Field(default=None, description="Parquet bytes staging would write.")
    estimated_chunks: int | None = Field(
        default=None, description="Chunks staging would write (of chunk_target_bytes)."
    )
    columns: list[PreviewColumn] | None = None
    sample: list[str] | None = Field(default=None, description="The first rows as a destination receives them.")
    sample_truncated: bool | None = None
    columns_truncated: bool | None = Field(default=None, description="True when columns were left out to fit.")
    error_message: str | None = Field(default=None, description="Why the preview failed.")
    worker_seconds: float | None = Field(default=None, description="From the preview Job's creation to its answer.")
    time_completed: str | None = None

    def document(self) -> dict:
        return self.model_dump(mode="json", exclude_none=True)
