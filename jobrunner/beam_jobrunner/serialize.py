"""Rows of a parquet chunk -> JSON messages, vectorized (see docs/message-format.md).

Per-row Python (to_pylist + json.dumps) caps transport at a fraction of what the brokers take,
so no row is touched by Python here. Two steps, the first per row group, the second per batch:
1. polars renders the columns to text by the format's rules, as column expressions (UTC
   timestamps with Z, decimals as strings, non-finite floats as null, integers beyond 2^53 as
   strings); string columns stay as they are, and 64-bit integers and microsecond timestamps
   are left to step 2, which renders them for less (_rows.c, INT64 and TIMESTAMP);
2. a small C extension (_rows.c) reads those columns in place (Arrow string views) and writes
   each row's pieces into one message, JSON-escaping string values that need it, all rows of a
   batch one after the other in one reused buffer; the Kafka sink gets them as Message objects
   (read-only bytes-like views of that buffer), the other sinks as str.
Measured on the benchmark's 1M-row chunk (docs/benchmarks.md, "jobrunner"), from the parquet
file to Python objects, encoding thread alone: 0.94-1.01 us of CPU per row now; 1.22-1.25 before
integers and timestamps were rendered in C and row groups rendered once; 1.40-1.51 with a bytes
object per message (a ~1 KB malloc each, freed by the producing thread); 1.6-1.85 with polars'
pl.format() + to_list(); 2.8 with DuckDB.

Why so few calls per batch: the encoding runs in a thread beside the producing thread, which
holds the GIL for every message it hands to librdkafka. Each time the encoder leaves native code
it has to win the GIL back, which can take a switch interval (5 ms); per-column calls did that
~100 times per batch and halved the encoder's speed. Polars releases the GIL inside select(),
_rows.rows() while it writes the messages; it holds it only to make the objects.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

# The producing thread and librdkafka need the other core: polars' pool is sized at import.
os.environ.setdefault("POLARS_MAX_THREADS", "1")
# Polars configures its allocator (jemalloc) to hand freed pages back to the kernel within 0.5-1 s,
# then faults them in again for the next batches; a worker lives for one chunk, so it keeps them
# (measured on the benchmark's chunk: page faults 0.05-0.1 -> 0.015 per row, 0.05-0.16 us CPU/row in two runs).
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")

import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402

from beam_jobrunner import _rows  # noqa: E402

MAX_SAFE_INT = 2**53 - 1
KEY_COLUMN = "unique_id"
# How _rows writes a column's values: rendered text as it is, between quotes, or between quotes
# and JSON-escaped where needed (strings from the table; the rendered types never need it); or
# renders them itself: 64-bit integers (quoted beyond 2^53 - 1) and microsecond timestamps of
# the years 1-9999 (the benchmark's chunk: 0.17 us/row in polars, ~0.03 in C).
RAW, QUOTED, STRING, INT64, TIMESTAMP = 0, 1, 2, 3, 4
MIN_MICROS, MAX_MICROS = -62_135_596_800_000_000, 253_402_300_799_999_999  # 0001-01-01 .. 9999-12-31
WHOLE_SECONDS, WITH_MICROS = "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%.6fZ"


def _micros(c: pl.Expr, dt: pl.Datetime, negative_ns: bool) -> pl.Expr:
    if dt.time_unit != "ns" or not negative_ns:
        return c.dt.epoch("us")
    # Nanoseconds are truncated toward zero, as an Arrow cast to microseconds does; polars' // floors.
    ns = c.dt.epoch("ns")
    return ns // 1000 + ((ns < 0) & (ns % 1000 != 0)).cast(pl.Int64)


def _checks(schema: pl.Schema) -> list[pl.Expr]:
    """Per row group: which columns need a rule that costs time on every row, and whether its
    microsecond timestamps are in the years _rows writes (c:). Int64 is _rows' own business."""
    out = []
    for name, dt in schema.items():
        c = pl.col(name)
        if dt.is_float():
            out.append((~c.is_finite()).any().alias(f"rule:{name}"))
        elif dt == pl.UInt64:
            out.append(((c > MAX_SAFE_INT) | (c < -MAX_SAFE_INT)).any().alias(f"rule:{name}"))
        elif isinstance(dt, pl.Datetime):
            out.append((c.dt.epoch("us") % 1_000_000 != 0).any().alias(f"rule:{name}"))
            out.append((c.dt.epoch("ns") < 0).any().alias(f"neg:{name}"))
            if dt.time_unit == "us":
                out.append(c.dt.epoch("us").is_between(MIN_MICROS, MAX_MICROS).all().alias(f"c:{name}"))
        elif dt == pl.Time:
            out.append((c.cast(pl.Int64) % 1_000_000_000 != 0).any().alias(f"rule:{name}"))
    return out


def _is_string(dt: pl.DataType) -> bool:
    return dt in (pl.String, pl.Categorical) or isinstance(dt, pl.Enum)


def _column(c: pl.Expr, dt: pl.DataType, rule: bool, negative: bool) -> tuple[pl.Expr, bool]:
    """(text of the value, whether the format puts it between quotes); null stays null."""
    if dt.is_float():
        f = c.cast(pl.Float64)  # a float32 is sent as the float64 it equals
        return (pl.when(f.is_finite()).then(f) if rule else f).cast(pl.String), False
    if dt == pl.UInt64 and rule:  # Int64 is rendered by _rows
        s = c.cast(pl.String)
        return pl.when((c > MAX_SAFE_INT) | (c < -MAX_SAFE_INT)).then(pl.format('"{}"', s)).otherwise(s), False
    if dt.is_integer() or dt == pl.Boolean:
        return c.cast(pl.String), False
    if isinstance(dt, pl.Datetime):
        if dt.time_zone or dt.time_unit != "us":  # UTC instants, naive, in microseconds
            us = _micros(c, dt, negative)
            c = pl.from_epoch(us, "us")
            whole = us % 1_000_000 == 0
        else:
            whole = c.dt.epoch("us") % 1_000_000 == 0
        if not rule:
            return c.dt.strftime(WHOLE_SECONDS), True
        return pl.when(whole).then(c.dt.strftime(WHOLE_SECONDS)).otherwise(c.dt.strftime(WITH_MICROS)), True
    if dt == pl.Date:
        return c.dt.strftime("%Y-%m-%d"), True
    if dt == pl.Time:
        if not rule:
            return c.dt.strftime("%H:%M:%S"), True
        return pl.when(c.cast(pl.Int64) % 1_000_000_000 == 0).then(c.dt.strftime("%H:%M:%S")).otherwise(
            c.dt.strftime("%H:%M:%S%.6f")
        ), True
    if isinstance(dt, pl.Decimal):
        return c.cast(pl.String), True  # exact digits: a JSON number would be rounded to a double
    if dt == pl.Binary:
        return c.bin.encode("base64"), True
    if dt == pl.Null:
        return pl.lit("null"), False
    # Anything else (nested types do not occur in a flat Snowflake table): polars' own JSON.
    return pl.struct(c.alias("a")).struct.json_encode().str.slice(5).str.head(-1), False


def _plan(df: pl.DataFrame) -> tuple[list[pl.Expr], list[bytes], list[int]]:
    """Per column of df: the expression rendering its values, the literal text before them
    (`{"name":` or `,"name":`) and how _rows writes them."""
    checks = _checks(df.schema)
    stats = df.select(checks).row(0, named=True) if checks else {}
    exprs, leads, modes = [], [], []
    for i, (name, dt) in enumerate(df.schema.items()):
        leads.append((("{" if i == 0 else ",") + json.dumps(name.lower(), ensure_ascii=False) + ":").encode())
        if _is_string(dt):
            expr, mode = pl.col(name).cast(pl.String), STRING
        elif dt == pl.Int64:
            expr, mode = pl.col(name), INT64
        elif isinstance(dt, pl.Datetime) and dt.time_unit == "us" and stats.get(f"c:{name}", True):
            expr, mode = pl.col(name), TIMESTAMP  # UTC instants, naive or with a zone
        else:
            expr, quoted = _column(pl.col(name), dt, bool(stats.get(f"rule:{name}")), bool(stats.get(f"neg:{name}")))
            mode = QUOTED if quoted else RAW
        exprs.append(expr.alias(f"_{i}"))
        modes.append(mode)
    return exprs, leads, modes


def _view_spec(arr: pa.Array, lead: bytes, mode: int) -> tuple:
    """What _rows reads of an array: its buffers' addresses (kept alive by arr)."""
    if mode in (INT64, TIMESTAMP):
        want = pa.types.is_int64 if mode == INT64 else lambda t: pa.types.is_timestamp(t) and t.unit == "us"
        if not want(arr.type):
            raise TypeError(f"serialize: a column for mode {mode} is {arr.type}")
        validity, ints = arr.buffers()
        return (lead, validity.address if validity is not None else 0, ints.address, (), arr.offset, len(arr), mode)
    if not pa.types.is_string_view(arr.type):
        raise TypeError(f"serialize: a rendered column is {arr.type}, not string_view")
    validity, views, *data = arr.buffers()
    return (
        lead,
        validity.address if validity is not None else 0,
        views.address,
        tuple(b.address for b in data),
        arr.offset,
        len(arr),
        mode,
    )


def render(df: pl.DataFrame) -> tuple[list[tuple], tuple, list]:
    """df's columns as _rows reads them: a spec per column, the key column's, and the arrays
    (which keep the specs' buffers alive). One polars select and one export for the frame, not
    one per column or per batch: each costs ~2-4 ms of Python and GIL hand-offs."""
    exprs, leads, modes = _plan(df)
    key_col = next((n for n in df.columns if n.lower() == KEY_COLUMN), None)
    exprs.append((pl.col(key_col).cast(pl.String) if key_col else pl.lit(None, pl.String)).alias("_key"))
    table = df.select(exprs).rechunk().to_arrow(compat_level=pl.CompatLevel.newest())
    arrays = [col.chunk(0) if col.num_chunks == 1 else col.combine_chunks() for col in table.columns]
    # arrays has one more entry than leads and modes: the key column, last.
    specs = [_view_spec(a, lead, mode) for a, lead, mode in zip(arrays[:-1], leads, modes, strict=True)]
    return specs, _view_spec(arrays[-1], b"", RAW), arrays


def _from(spec: tuple, start: int) -> tuple:
    lead, validity, views, buffers, offset, length, mode = spec
    return lead, validity, views, buffers, offset + start, length - start, mode


def encode_rendered(rendered: tuple, start: int, n: int, as_bytes: bool) -> tuple[list, list, int]:
    """Rows start .. start + n of a render()ed frame: the JSON text of each, its key (unique_id
    as text, or None) and the UTF-8 size of all. as_bytes: values are _rows.Message (read-only
    bytes-like) and keys bytes; else both are str."""
    specs, key_spec, _ = rendered
    values, nbytes = _rows.rows([_from(c, start) for c in specs], b"}", n, not as_bytes)
    return values, _rows.values(_from(key_spec, start), n, not as_bytes), nbytes


def encode_frame(df: pl.DataFrame, as_bytes: bool) -> tuple[list, list, int]:
    """encode_rendered() of all of df."""
    return encode_rendered(render(df), 0, df.height, as_bytes)


def _wide_decimals(schema: pa.Schema) -> bool:
    # Snowflake's NUMBER stops at 38 digits; wider decimals only come from files written by
    # something else, and go through pyarrow as strings.
    return any(pa.types.is_decimal(f.type) and f.type.precision > 38 for f in schema)


def _frame(table: pa.Table) -> pl.DataFrame:
    for i, f in enumerate(table.schema):
        if pa.types.is_decimal(f.type) and f.type.precision > 38:
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return pl.from_arrow(table)


def _slices(path: str, batch_rows: int, first_batch_rows: int | None) -> Iterator[tuple[tuple, int, int]]:
    """(rendered row group, first row, rows) of a local parquet file, at most batch_rows at a
    time, in row order; decoded and rendered one row group at a time."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as meta:
        wide = _wide_decimals(meta.schema_arrow)
        first = 0
        for g in range(meta.metadata.num_row_groups):
            n = meta.metadata.row_group(g).num_rows
            if wide:
                df = _frame(meta.read_row_group(g, use_threads=False))
            else:  # slicing on a row group's bounds decodes that group only
                df = pl.scan_parquet(path).slice(first, n).collect()
            first += n
            rendered = render(df)  # once per row group; the batches are slices of it
            start = 0
            while start < n:
                rows = min(batch_rows if first_batch_rows is None else min(first_batch_rows, batch_rows), n - start)
                first_batch_rows = None
                yield rendered, start, rows
                start += rows


def parquet_batches(
    path: str, batch_rows: int, *, as_bytes: bool = False, first_batch_rows: int | None = None
) -> Iterator[tuple[list, list, int]]:
    """(values, keys, UTF-8 size of the values) of a local parquet file, at most batch_rows at a
    time, in row order.

    Decoded one row group at a time (staged chunks have 65,536-row groups, see stage.py), so
    memory holds one row group's columns (decoded and rendered) and the batches' JSON not yet
    freed by the consumer. first_batch_rows: a smaller first batch, so whoever waits for it (the
    producer, idle until then) starts sooner.
    """
    for rendered, start, rows in _slices(path, batch_rows, first_batch_rows):
        yield encode_rendered(rendered, start, rows, as_bytes)


def encode_array(rendered: tuple, start: int, n: int, as_bytes: bool) -> tuple[object, list]:
    """Rows start .. start + n of a render()ed frame as one JSON array (UTF-8, a bytes-like
    _rows.Message), and their keys (bytes with as_bytes, else str): what a transform gets
    (beam_jobrunner.transform), written in one native call, no object per row."""
    specs, key_spec, _ = rendered
    return _rows.array([_from(c, start) for c in specs], n), _rows.values(_from(key_spec, start), n, not as_bytes)


def parquet_arrays(
    path: str, batch_rows: int, *, as_bytes: bool = False, first_batch_rows: int | None = None
) -> Iterator[tuple[object, list]]:
    """parquet_batches(), each batch as one JSON array and its keys (encode_array)."""
    for rendered, start, rows in _slices(path, batch_rows, first_batch_rows):
        yield encode_array(rendered, start, rows, as_bytes)


def encode(table: pa.Table, as_bytes: bool = False) -> tuple[list, list]:
    """JSON text of every row and its Kafka key (unique_id), in row order, as Python lists: str,
    or with as_bytes what the Kafka sink sends (_rows.Message values, bytes keys)."""
    values, keys, _ = encode_frame(_frame(table), as_bytes)
    return values, keys
