"""Rows of a parquet chunk -> JSON messages, vectorized (see docs/message-format.md).

Per-row Python (to_pylist + json.dumps) caps transport at a fraction of what the brokers take,
so the chunk becomes JSON in one DuckDB query: the format's rules are SQL expressions (UTC
timestamps with Z, decimals as strings, non-finite floats as null, integers beyond 2^53 as
strings) and to_json() renders each row. DuckDB also reads the parquet file itself, for about half
the CPU of decoding it with pyarrow first.

Why one streaming query and so little Python around it: the encoding runs in a thread beside
the producing thread, which holds the GIL for every message it hands to librdkafka. Each time
the encoder leaves C code it has to win the GIL back, which can take a switch interval (5 ms);
per-column Arrow compute calls did that ~100 times per batch and halved the encoder's speed.
A streaming query releases the GIL once per batch.

The Kafka sink gets UTF-8 bytes (what the producer copies as is; building them from Arrow
costs less than building str), the other sinks get str.
"""

from __future__ import annotations

import threading
from typing import Iterator

import duckdb
import pyarrow as pa

MAX_SAFE_INT = 2**53 - 1
KEY_COLUMN = "unique_id"

_local = threading.local()


def _con() -> duckdb.DuckDBPyConnection:
    # A DuckDB connection is not safe to share between threads; one per thread, reused.
    con = getattr(_local, "con", None)
    if con is None:
        con = _local.con = duckdb.connect()
        con.execute("SET threads TO 1")  # the producing thread and librdkafka need the other core
    return con


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _timestamp_sql(src: str, t: pa.TimestampType) -> str:
    # Whole seconds without a fraction, anything else with 6 digits (microsecond precision).
    # tz-aware values are UTC instants: rebuilt from epoch micros as naive timestamps, since
    # DuckDB would format a TIMESTAMPTZ in the session's zone. Nanoseconds are truncated
    # toward zero (`//` on BIGINT), as an Arrow cast to microseconds does.
    if t.unit == "us" and not t.tz:
        ts, micros = src, f"epoch_us({src})"
    else:
        micros = f"(epoch_ns({src}) // 1000)" if t.unit == "ns" else f"epoch_us({src})"
        ts = f"make_timestamp({micros})"
    return (f"CASE WHEN {micros} % 1000000 = 0 THEN strftime({ts}, '%Y-%m-%dT%H:%M:%SZ') "
            f"ELSE strftime({ts}, '%Y-%m-%dT%H:%M:%S.%fZ') END")


def _columns(schema: pa.Schema) -> list[tuple[str, str, tuple[str, str] | None]]:
    """(output name, SQL that renders the column, optional (check, rule)) for each column.

    A check counts the rows that need a per-value rule (non-finite floats, integers past 2^53);
    the rule's CASE costs time on every row, so it is only applied when some row needs it.
    """
    out = []
    for field in schema:
        name, t, src = field.name.lower(), field.type, _q(field.name)
        expr, check = src, None
        if pa.types.is_timestamp(t):
            expr = _timestamp_sql(src, t)
        elif pa.types.is_date(t):
            expr = f"strftime({src}::DATE, '%Y-%m-%d')"
        elif pa.types.is_decimal(t):
            expr = f"{src}::VARCHAR"  # exact digits: a JSON number would be rounded to a double
        elif pa.types.is_floating(t):
            check = (f"count(*) FILTER (WHERE NOT isfinite({src}))", f"CASE WHEN isfinite({src}) THEN {src} END")
        elif pa.types.is_int64(t) or pa.types.is_uint64(t):
            big = f"{src} > {MAX_SAFE_INT} OR {src} < -{MAX_SAFE_INT}"
            check = (f"count(*) FILTER (WHERE {big})", f"CASE WHEN {big} THEN to_json({src}::VARCHAR) ELSE to_json({src}) END")
        elif pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t):
            expr = f"to_base64({src}::BLOB)"
        out.append((name, expr, check))
    return out


def render_sql(schema: pa.Schema, source: str, con: duckdb.DuckDBPyConnection) -> str:
    """The query that turns `source` (rows with `schema`) into (v: JSON text, k: key)."""
    cols = _columns(schema)
    checks = [c for c in cols if c[2] is not None]
    needed: set[str] = set()
    if checks:
        counts = con.sql(f"SELECT {', '.join(c[2][0] for c in checks)} FROM {source}").fetchall()[0]
        needed = {name for (name, _, _), n in zip(checks, counts) if n}
    select = []
    for name, expr, check in cols:
        if name in needed:
            expr = check[1]
        select.append(f"{_q(name)} := {expr}")
    key = next((f"{_q(f.name)}::VARCHAR" for f in schema if f.name.lower() == KEY_COLUMN), "NULL::VARCHAR")
    return f"SELECT to_json(struct_pack({', '.join(select)}))::VARCHAR AS v, {key} AS k FROM {source}"


def _sql_string(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _decimals_beyond_duckdb(schema: pa.Schema) -> bool:
    # DuckDB's DECIMAL stops at 38 digits (it would read wider ones as DOUBLE); Snowflake's
    # NUMBER does too, so this only guards files written by something else.
    return any(pa.types.is_decimal(f.type) and f.type.precision > 38 for f in schema)


def _as_lists(values, keys, as_bytes: bool) -> tuple[list, list]:
    if as_bytes:  # a zero-copy view; bytes need no UTF-8 validation, so they are made faster than str
        values, keys = values.cast(pa.binary()), keys.cast(pa.binary())
    return values.to_pylist(), keys.to_pylist()


def parquet_batches(path: str, batch_rows: int, *, as_bytes: bool = False) -> Iterator[tuple[list, list]]:
    """(values, keys) of a local parquet file, batch_rows at a time, in row order."""
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if _decimals_beyond_duckdb(schema):
        for rb in pq.ParquetFile(path).iter_batches(batch_size=batch_rows):
            yield _as_lists(*encode_arrow(pa.Table.from_batches([rb])), as_bytes)
        return
    con = _con()
    reader = con.sql(render_sql(schema, f"read_parquet({_sql_string(path)})", con)).to_arrow_reader(batch_rows)
    try:
        for rb in reader:
            yield _as_lists(rb.column(0), rb.column(1), as_bytes)
    finally:
        reader.close()


def encode_arrow(table: pa.Table) -> tuple[pa.ChunkedArray, pa.ChunkedArray]:
    """JSON text of every row of an in-memory table and its key (unique_id, or null), as Arrow strings."""
    if _decimals_beyond_duckdb(table.schema):
        for i, f in enumerate(table.schema):
            if pa.types.is_decimal(f.type) and f.type.precision > 38:
                table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    con = _con()
    con.register("batch", table)
    try:
        out = con.sql(render_sql(table.schema, "batch", con)).to_arrow_table()
    finally:
        con.unregister("batch")
    return out.column("v"), out.column("k")


def encode_bytes(table: pa.Table) -> tuple[list[bytes], list[bytes | None]]:
    """JSON of every row and its key as UTF-8 bytes, what a Kafka producer sends as is."""
    return _as_lists(*encode_arrow(table), True)


def encode(table: pa.Table) -> tuple[list[str], list[str | None]]:
    """JSON text of every row and its Kafka key (unique_id), in row order, as Python lists."""
    return _as_lists(*encode_arrow(table), False)
