"""`beam-jobrunner preview`: what a backfill of a window would stage, measured before anything runs.

The operator runs this as a short Job in the organization's namespace (the Snowflake
credentials are given to workers only) for a BeamPreview (beam_contract.preview). With staging's
connection (stage.snowflake_connect) and staging's WHERE clause and projection (sql.py) it runs
two queries and writes no file anywhere:
1. `SELECT COUNT(*)` over the window (and filter): the rows staging would export;
2. the window's first MEASURE_ROWS rows in partition order (staging's SELECT has no ORDER BY:
   the earliest rows are the ones a user calls "the first"), fetched as Arrow batches and
   normalised as staging does, then written by staging's own ChunkWriter into memory instead of
   storage: its parquet size over its rows is `bytes_per_row`. The query's description gives
   the columns and their Snowflake types, in export order, even when the window is empty.
The first `sample_rows` rows are read back from that parquet and encoded as transport encodes a
staged chunk (serialize.py: the same polars read of the file, the same rendering), so each
sample row is byte for byte the message a destination receives.

The result (PreviewResult) is one line of JSON, the termination message, kept to
RESULT_MAX_BYTES (under the kubelet's TERMINATION_MESSAGE_MAX_BYTES, as __main__ writes it):
- the sample rows travel compressed (`sample_z`: a JSON list, zlib, base64), each cut to
  SAMPLE_ROW_MAX_CHARS characters, then trailing rows dropped until the line fits; either sets
  `sample_truncated`;
- if even the columns alone do not fit (hundreds of columns), `columns` keeps the first ones
  that fit (in export order), the sample is empty, `columns_truncated` is set (a field this
  worker added to PreviewResult), and `sample_truncated` too unless no sample was asked for.
With spec.transforms, the window's first MEASURE_ROWS rows (as encoded above) run through the
scripts in one sandbox, as transport runs them (transform.py), and the sample is the first
`sample_rows` rows they make. A script that does not compile fails the preview before anything
connects; one that throws on a row fails it with transport's message (chunk 0, the row's
unique_id, the line and column), exit 2.
Failures are staging's: a missing table or a bad column exits 2 (PERMANENT) with staging's
message, an unreachable Snowflake exits 3 (TRANSIENT).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time

from beam_contract.preview import MEASURE_ROWS, SAMPLE_ROW_MAX_CHARS, PreviewColumn, PreviewResult, PreviewSpec
from beam_contract.worker import TERMINATION_MESSAGE_MAX_BYTES
from beam_jobrunner import sql, stage, transform
from beam_jobrunner.config import PreviewConfig, env
from beam_jobrunner.errors import JobError

log = logging.getLogger("beam_jobrunner.preview")

# The result line's budget: the kubelet keeps TERMINATION_MESSAGE_MAX_BYTES; the rest is margin.
RESULT_MAX_BYTES = 3800
assert RESULT_MAX_BYTES < TERMINATION_MESSAGE_MAX_BYTES

# Snowflake's type names where the connector's (FIELD_ID_TO_NAME) are internal ones.
_TYPE_NAMES = {"FIXED": "NUMBER", "REAL": "FLOAT"}
# Types whose description carries a fractional-seconds precision (its `scale`).
_SCALED = {"TIME", "TIMESTAMP_NTZ", "TIMESTAMP_LTZ", "TIMESTAMP_TZ"}


def line(doc: dict) -> bytes:
    """The termination line as __main__ writes it (json.dumps, compact, ASCII)."""
    return json.dumps(doc, separators=(",", ":")).encode()


def column_type(meta) -> str:
    """A cursor.description entry's Snowflake type: NUMBER(38,0), FLOAT, TEXT, TIMESTAMP_NTZ(9)..."""
    from snowflake.connector.constants import FIELD_ID_TO_NAME

    name = FIELD_ID_TO_NAME.get(meta.type_code, f"TYPE_{meta.type_code}")
    name = _TYPE_NAMES.get(name, name)
    if name == "NUMBER" and meta.precision is not None:
        return f"NUMBER({meta.precision},{meta.scale or 0})"
    if name in _SCALED and meta.scale is not None:
        return f"{name}({meta.scale})"
    return name


class _MeasureWriter(stage.ChunkWriter):
    """Staging's ChunkWriter (its parquet settings, its row groups, its schema rules) whose one
    chunk stays in memory instead of going to storage."""

    def __init__(self) -> None:
        super().__init__("", 2**62, int(env("BEAM_CHUNK_ROW_GROUP_ROWS", str(stage.ROW_GROUP_ROWS))))
        self.data = b""
        self.rows = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        self.data, self.rows = self._sink.getvalue().to_pybytes(), self._rows
        self._writer, self._sink, self._rows = None, None, 0


def _sample(parquet: bytes, n: int) -> list[str]:
    """The first n rows of a parquet file as transport delivers them (serialize.parquet_batches:
    the same read of the file, then the same rendering), as str."""
    if n <= 0 or not parquet:
        return []
    import polars as pl
    import pyarrow.parquet as pq

    from beam_jobrunner import serialize

    f = pq.ParquetFile(io.BytesIO(parquet))
    if serialize._wide_decimals(f.schema_arrow):
        df = serialize._frame(f.read(use_threads=False).slice(0, n))
    else:
        df = pl.read_parquet(io.BytesIO(parquet), n_rows=n)
    values, _, _ = serialize.encode_frame(df, as_bytes=False)
    return [str(v) for v in values]


def fit(num_rows: int, bytes_per_row: float, columns: list[PreviewColumn], sample: list[str]) -> dict:
    """The PreviewResult document, cut to RESULT_MAX_BYTES as the module's docstring says."""
    cut = [row[:SAMPLE_ROW_MAX_CHARS] for row in sample]
    doc = PreviewResult(
        num_rows=num_rows,
        bytes_per_row=bytes_per_row,
        columns=columns,
        sample_z=PreviewResult.pack(cut),
        sample_truncated=cut != sample,
    ).model_dump(mode="json")
    size = len(line(doc))
    while size > RESULT_MAX_BYTES and cut:
        cut.pop()
        doc["sample_z"] = PreviewResult.pack(cut)
        doc["sample_truncated"] = True
        size = len(line(doc))
    if size > RESULT_MAX_BYTES:  # the columns alone: keep the first ones that fit
        doc["sample_truncated"] = bool(sample)
        doc["columns_truncated"] = True
        entries, doc["columns"] = doc["columns"], []
        size = len(line(doc))
        for i, entry in enumerate(entries):
            size += len(line(entry)) + (1 if i else 0)  # the entry and the comma before it
            if size > RESULT_MAX_BYTES:
                break
            doc["columns"].append(entry)
    assert len(line(doc)) <= RESULT_MAX_BYTES, len(line(doc))
    return doc


def measure(spec: PreviewSpec, conn) -> tuple[int, list[PreviewColumn], _MeasureWriter]:
    """(rows in the window, its columns, the writer holding its first MEASURE_ROWS rows)."""
    count, first = sql.count_query(spec), sql.first_rows_query(spec, MEASURE_ROWS)
    cur = conn.cursor()
    try:
        t0 = time.monotonic()
        cur.execute(count.sql, count.params)
        num_rows = int(cur.fetchone()[0])
        log.info(
            "preview: counted in %.2fs: %s (%d parameters)", time.monotonic() - t0, count.sql[:300], len(count.params)
        )
        t0 = time.monotonic()
        cur.execute(first.sql, first.params)
        columns = [PreviewColumn(name=m.name.lower(), type=column_type(m)) for m in cur.description]
        writer = _MeasureWriter()
        for table in cur.fetch_arrow_batches():
            writer.write(stage._normalize(table))
        writer.close()
        log.info("preview: first rows in %.2fs: %s", time.monotonic() - t0, first.sql[:300])
        return num_rows, columns, writer
    except JobError:
        raise
    except Exception as e:
        raise stage._query_error(e, spec.table) from None
    finally:
        cur.close()


def run(cfg: PreviewConfig) -> dict:
    spec = cfg.spec
    sql.first_rows_query(spec, MEASURE_ROWS)  # refuse a bad name before connecting anywhere
    # and a script that does not compile (one sandbox: a sample is a few rows)
    transformer = transform.Transformer.of(
        spec.transforms, dataclasses.replace(transform.Limits.from_env(), sandboxes=1)
    )
    try:
        return _run(cfg, transformer.start() if transformer else None)
    finally:
        if transformer:
            transformer.close()


def _run(cfg: PreviewConfig, transformer) -> dict:
    spec = cfg.spec
    t0 = time.monotonic()
    import snowflake.connector  # noqa: F401  (half a second or more: not the connection's time)

    loaded, t0 = time.monotonic() - t0, time.monotonic()
    conn = stage.snowflake_connect(cfg.connect_timeout)
    log.info("connected to Snowflake in %.2fs (its connector loaded in %.2fs)", time.monotonic() - t0, loaded)
    try:
        num_rows, columns, writer = measure(spec, conn)
    finally:
        conn.close()
    bytes_per_row = len(writer.data) / writer.rows if writer.rows else 0.0
    if transformer:  # every row read runs through the scripts: a wider try than the sample
        read = _sample(writer.data, writer.rows)
        made = transform.transform_messages(transformer, read)
        log.info("preview: the transforms made %d rows of the first %d rows", len(made), len(read))
        sample = made[: spec.sample_rows]
    else:
        sample = _sample(writer.data, min(spec.sample_rows, writer.rows))
    doc = fit(num_rows, bytes_per_row, columns, sample)
    log.info(
        "preview: %s rows in the window, %.1f bytes per row measured on %d rows, in %.2f s",
        f"{num_rows:,}",
        bytes_per_row,
        writer.rows,
        time.monotonic() - t0,
    )
    if doc["sample_truncated"] or doc["columns_truncated"]:
        log.info(
            "preview: result cut to fit the termination message: %d of %d sample rows, %d of %d columns",
            len(PreviewResult.model_validate(doc).sample()),
            len(sample),
            len(doc["columns"]),
            len(columns),
        )
    return doc
