"""Rows of a parquet chunk -> JSON messages, vectorized (see docs/message-format.md).

Per-row Python (to_pylist + json.dumps) caps transport at a fraction of what the brokers take,
so a batch is turned into JSON without touching rows in Python: Arrow compute applies the
format's rules column by column (UTC timestamps with Z, decimals as strings, non-finite floats
as null), then one DuckDB query renders each row with to_json(). Integers beyond 2^53 are the
one per-value rule Arrow cannot express in a typed column; only a batch that has such a value
pays for a DuckDB CASE on that column. DuckDB releases the GIL, so the next batch is encoded
while the current one is produced.
"""

from __future__ import annotations

import threading

import duckdb
import pyarrow as pa
import pyarrow.compute as pc

MAX_SAFE_INT = 2**53 - 1
KEY_COLUMN = "unique_id"

_local = threading.local()


def _con() -> duckdb.DuckDBPyConnection:
    # A DuckDB connection is not safe to share between threads; one per thread, reused.
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect()
        con.execute("SET threads TO 1")  # the producing thread needs the other core
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _timestamps(col: pa.ChunkedArray) -> pa.ChunkedArray:
    t = col.type
    if t.tz:  # tz-aware values are UTC instants: drop the zone, keep the instant
        col = col.cast(pa.int64()).cast(pa.timestamp(t.unit))
    micros = pc.cast(col, pa.timestamp("us"), safe=False)
    seconds = pc.cast(micros, pa.timestamp("s"), safe=False)
    whole = pc.strftime(seconds, format="%Y-%m-%dT%H:%M:%SZ")
    if t.unit == "s":
        return whole
    is_whole = pc.equal(pc.cast(seconds, pa.timestamp("us")), micros)
    if pc.all(pc.or_kleene(is_whole, pc.is_null(micros))).as_py() is not False:
        return whole
    # %S of a microsecond timestamp prints the fraction: SS.ffffff
    frac = pc.binary_join_element_wise(pc.strftime(micros, format="%Y-%m-%dT%H:%M:%S"), "Z", "")
    return pc.if_else(is_whole, whole, frac)


def prepare(table: pa.Table) -> tuple[pa.Table, list[str]]:
    """The batch with every column in its JSON-ready form, and the SELECT list that renders it."""
    cols, names, select = [], [], []
    for field, col in zip(table.schema, table.columns):
        name, t = field.name.lower(), field.type
        expr = _q(name)
        if pa.types.is_timestamp(t):
            col = _timestamps(col)
        elif pa.types.is_date(t):
            col = pc.strftime(col.cast(pa.timestamp("s")), format="%Y-%m-%d")
        elif pa.types.is_decimal(t):
            col = col.cast(pa.string())  # exact digits: a JSON number would be rounded to a double
        elif pa.types.is_floating(t):
            finite = pc.is_finite(col)
            if pc.all(pc.or_kleene(finite, pc.is_null(col))).as_py() is False:
                col = pc.if_else(finite, col, pa.scalar(None, t))
        elif pa.types.is_int64(t) or pa.types.is_uint64(t):
            mm = pc.min_max(col)
            lo, hi = mm["min"].as_py(), mm["max"].as_py()
            if (hi is not None and hi > MAX_SAFE_INT) or (lo is not None and lo < -MAX_SAFE_INT):
                expr = (f"CASE WHEN {expr} > {MAX_SAFE_INT} OR {expr} < -{MAX_SAFE_INT} "
                        f"THEN to_json({expr}::VARCHAR) ELSE to_json({expr}) END")
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            expr = f"to_base64({expr}::BLOB)"
        cols.append(col)
        names.append(name)
        select.append(f"{expr} AS {_q(name)}" if expr != _q(name) else expr)
    return pa.Table.from_arrays(cols, names=names), select


def encode(table: pa.Table) -> tuple[list[str], list[str | None]]:
    """JSON text of every row and its Kafka key (unique_id), in row order."""
    batch, select = prepare(table)
    key = f"{_q(KEY_COLUMN)}::VARCHAR" if KEY_COLUMN in batch.column_names else "NULL::VARCHAR"
    con = _con()
    con.register("batch", batch)
    try:
        out = con.sql(f"SELECT to_json(r)::VARCHAR AS v, {key} AS k FROM (SELECT {', '.join(select)} FROM batch) r").to_arrow_table()
    finally:
        con.unregister("batch")
    return out.column("v").to_pylist(), out.column("k").to_pylist()
