"""Rows of a parquet chunk -> JSON messages, vectorized (see docs/message-format.md).

Per-row Python (to_pylist + json.dumps) caps transport at a fraction of what the brokers take,
so each batch is turned into JSON by one DuckDB query over the Arrow data: json_object() over
per-column expressions that apply the format's rules (UTC timestamps with Z, integers beyond
2^53 and decimals as strings, non-finite floats as null). DuckDB releases the GIL while it
works, so the next batch is encoded while the current one is being produced.
"""

from __future__ import annotations

import threading
from functools import lru_cache

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
        con.execute("SET threads TO 1")  # the producer thread needs the other core
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _prepare(table: pa.Table) -> pa.Table:
    """Arrow-side normalization DuckDB cannot do without extensions: time zones, names."""
    cols, names = [], []
    for field, col in zip(table.schema, table.columns):
        t = field.type
        if pa.types.is_timestamp(t):
            # tz-aware values are stored as UTC instants: drop the zone, keep the instant.
            # Microseconds: DuckDB's TIMESTAMP precision and far below a block's granularity.
            col = col.cast(pa.int64()).cast(pa.timestamp(t.unit)) if t.tz else col
            if t.unit == "ns":
                col = pc.cast(col, pa.timestamp("us"), safe=False)
        cols.append(col)
        names.append(field.name.lower())
    return pa.Table.from_arrays(cols, names=names)


def _expr(name: str, t: pa.DataType) -> str:
    c = _q(name)
    if pa.types.is_int64(t) or pa.types.is_uint64(t):
        return (f"CASE WHEN {c} > {MAX_SAFE_INT} OR {c} < -{MAX_SAFE_INT} "
                f"THEN to_json({c}::VARCHAR) ELSE to_json({c}) END")
    if pa.types.is_floating(t):
        return f"CASE WHEN isfinite({c}) THEN {c}::DOUBLE END"
    if pa.types.is_decimal(t):
        return f"{c}::VARCHAR"
    if pa.types.is_timestamp(t):
        return (f"CASE WHEN microsecond({c}) % 1000000 = 0 THEN strftime({c}, '%Y-%m-%dT%H:%M:%SZ') "
                f"ELSE strftime({c}, '%Y-%m-%dT%H:%M:%S.%fZ') END")
    if pa.types.is_date(t):
        return f"strftime({c}, '%Y-%m-%d')"
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
        return f"to_base64({c}::BLOB)"
    return c


@lru_cache(maxsize=32)
def _query(schema: pa.Schema) -> str:
    pairs = ", ".join(f"{_sql_str(f.name)}, {_expr(f.name, f.type)}" for f in schema)
    key = f"{_q(KEY_COLUMN)}::VARCHAR" if KEY_COLUMN in schema.names else "NULL::VARCHAR"
    return f"SELECT json_object({pairs})::VARCHAR AS v, {key} AS k FROM batch"


def encode(table: pa.Table) -> tuple[list[str], list[str | None]]:
    """JSON text of every row and its Kafka key (unique_id), in row order."""
    batch = _prepare(table)
    con = _con()
    con.register("batch", batch)
    try:
        out = con.execute(_query(batch.schema)).to_arrow_table()
    finally:
        con.unregister("batch")
    return out.column("v").to_pylist(), out.column("k").to_pylist()
