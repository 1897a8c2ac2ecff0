"""Rows of a parquet chunk -> JSON messages, vectorized (see docs/message-format.md).

Per-row Python (to_pylist + json.dumps) caps transport at a fraction of what the brokers take,
so each batch becomes JSON in polars: the format's rules are column expressions (UTC timestamps
with Z, decimals as strings, non-finite floats as null, integers beyond 2^53 as strings) and one
pl.format() writes every row's text from the rendered columns. Measured on the benchmark's
1M-row chunk (docs/benchmarks.md, "jobrunner"): 1.85 us of CPU per row from the parquet file to
Python bytes, against 2.8 for DuckDB's to_json(struct_pack()) and 2.6 for DuckDB string
concatenation; polars also decodes the parquet file in half of pyarrow's CPU.

Strings are pasted between quotes as they are unless they need JSON escaping, which costs about
as much as everything else together when done on every value. Whether they need it is checked
with what is cheap: `"` and `\\` once per row group, by memchr over the string columns' Arrow
buffers whole (a regex call per value cost 0.2 us per row on the benchmark's 12 string
columns), and control characters per batch by the smallest byte of the
rendered text. Only a column that fails gets escaped (by polars' JSON encoder).

Why so few calls per batch: the encoding runs in a thread beside the producing thread, which
holds the GIL for every message it hands to librdkafka. Each time the encoder leaves native code
it has to win the GIL back, which can take a switch interval (5 ms); per-column calls did that
~100 times per batch and halved the encoder's speed. Polars releases the GIL inside select().

The Kafka sink gets UTF-8 bytes (what the producer copies as is; they cost less to build than
str), the other sinks get str.
"""

from __future__ import annotations

import ctypes
import json
import os
from typing import Iterator

# The producing thread and librdkafka need the other core: polars' pool is sized at import.
os.environ.setdefault("POLARS_MAX_THREADS", "1")
# Polars configures its allocator (jemalloc) to hand freed pages back to the kernel within 0.5-1 s,
# then faults them in again for the next batches; a worker lives for one chunk, so it keeps them
# (measured on the benchmark's chunk: page faults 0.05-0.1 -> 0.015 per row, 0.05-0.16 us CPU/row in two runs).
os.environ.setdefault("_RJEM_MALLOC_CONF", "dirty_decay_ms:-1,muzzy_decay_ms:-1")

import polars as pl  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

MAX_SAFE_INT = 2**53 - 1
KEY_COLUMN = "unique_id"
QUOTE_OR_BACKSLASH = r'["\\]'  # a two-byte class: the regex engine scans it with memchr2
NEEDS_ESCAPE = r'[\x00-\x1f"\\]'
WHOLE_SECONDS, WITH_MICROS = "%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%dT%H:%M:%S%.6fZ"


def _literal(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")  # pl.format() reads "{}" as a placeholder


def _micros(c: pl.Expr, dt: pl.Datetime, negative_ns: bool) -> pl.Expr:
    if dt.time_unit != "ns" or not negative_ns:
        return c.dt.epoch("us")
    # Nanoseconds are truncated toward zero, as an Arrow cast to microseconds does; polars' // floors.
    ns = c.dt.epoch("ns")
    return ns // 1000 + ((ns < 0) & (ns % 1000 != 0)).cast(pl.Int64)


def _checks(schema: pl.Schema) -> list[pl.Expr]:
    """Per batch: which columns need a rule that costs time on every row."""
    out = []
    for name, dt in schema.items():
        c = pl.col(name)
        out.append(c.null_count().alias(f"nulls:{name}"))
        if dt.is_float():
            out.append((~c.is_finite()).any().alias(f"rule:{name}"))
        elif dt in (pl.Int64, pl.UInt64):
            out.append(((c > MAX_SAFE_INT) | (c < -MAX_SAFE_INT)).any().alias(f"rule:{name}"))
        elif isinstance(dt, pl.Datetime):
            out.append((c.dt.epoch("us") % 1_000_000 != 0).any().alias(f"rule:{name}"))
            out.append((c.dt.epoch("ns") < 0).any().alias(f"neg:{name}"))
        elif dt == pl.Time:
            out.append((c.cast(pl.Int64) % 1_000_000_000 != 0).any().alias(f"rule:{name}"))
    return out


def _column(c: pl.Expr, dt: pl.DataType, rule: bool, negative: bool, escape: bool) -> tuple[pl.Expr, bool]:
    """(text of the value, whether the format puts it between quotes)."""
    if dt in (pl.String, pl.Categorical) or isinstance(dt, pl.Enum):
        if escape:  # {"a":<JSON string>} -> <JSON string>
            return pl.struct(c.cast(pl.String).alias("a")).struct.json_encode().str.slice(5).str.head(-1), False
        return c.cast(pl.String), True
    if dt.is_float():
        f = c.cast(pl.Float64)  # a float32 is sent as the float64 it equals
        return (pl.when(f.is_finite()).then(f) if rule else f).cast(pl.String), False
    if dt in (pl.Int64, pl.UInt64) and rule:
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
        return pl.when(c.cast(pl.Int64) % 1_000_000_000 == 0).then(c.dt.strftime("%H:%M:%S")).otherwise(c.dt.strftime("%H:%M:%S%.6f")), True
    if isinstance(dt, pl.Decimal):
        return c.cast(pl.String), True  # exact digits: a JSON number would be rounded to a double
    if dt == pl.Binary:
        return c.bin.encode("base64"), True
    if dt == pl.Null:
        return pl.lit("null"), False
    # Anything else (nested types do not occur in a flat Snowflake table): polars' own JSON.
    return pl.struct(c.alias("a")).struct.json_encode().str.slice(5).str.head(-1), False


def render(df: pl.DataFrame, escape: frozenset[str] = frozenset()) -> pl.Expr:
    """The expression that turns each row of df into its JSON text; `escape`: string columns
    whose values need JSON escaping (the others are pasted between quotes as they are)."""
    stats = df.select(_checks(df.schema)).row(0, named=True) if df.width else {}
    fmt, args = "", []
    for i, (name, dt) in enumerate(df.schema.items()):
        lead = ("{" if i == 0 else ",") + json.dumps(name.lower(), ensure_ascii=False) + ":"
        expr, quoted = _column(pl.col(name), dt, bool(stats.get(f"rule:{name}")), bool(stats.get(f"neg:{name}")),
                               name in escape)
        if stats[f"nulls:{name}"]:
            if quoted:
                expr, quoted = pl.format('"{}"', expr), False
            expr = expr.fill_null("null")
        fmt += _literal(lead) + ('"{}"' if quoted else "{}")
        args.append(expr)
    if not args:
        return pl.lit("{}")
    return pl.format(fmt + "}}", *args)


INLINE_BYTES = 12  # Arrow string views keep values up to this long inside the view, not in a data buffer


def _strings(df: pl.DataFrame) -> list[str]:
    return [n for n, dt in df.schema.items() if dt in (pl.String, pl.Categorical) or isinstance(dt, pl.Enum)]


def _memchr():
    try:
        f = ctypes.CDLL(None).memchr
    except (OSError, AttributeError):
        return None
    f.restype, f.argtypes = ctypes.c_void_p, (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
    return f


# libc's memchr, straight on Arrow's memory: copying the buffers into bytes for bytes.find
# cost as much as the search it replaced (0.15 us per row on the benchmark's chunk).
_MEMCHR = _memchr()


def _buffer_holds(buf: pa.Buffer, needles: bytes) -> bool:
    if _MEMCHR is not None:
        return any(_MEMCHR(buf.address, n, buf.size) for n in needles)
    raw = buf.to_pybytes()
    return any(bytes([n]) in raw for n in needles)


def _buffers_hold(text: pl.Series, needles: bytes, views: bool) -> bool:
    """Whether the buffers under a string column contain one of the needle bytes (memchr over
    each buffer: a pass over memory instead of a regex call per value). views=False: the data
    buffers, views=True: the views (where values of up to INLINE_BYTES are kept whole, after a
    length below 13 and before zero padding). Conservative: polars' views point into the decoded
    parquet pages, whose length prefixes and headers are scanned as well, and the buffers may
    hold rows outside the frame, so it may answer yes for a column that has no such byte."""
    arr = text.to_arrow(compat_level=pl.CompatLevel.newest())
    for chunk in arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]:
        if not pa.types.is_string_view(chunk.type):
            return True
        for buf in chunk.buffers()[1:2] if views else chunk.buffers()[2:]:
            if buf is not None and buf.size and _buffer_holds(buf, needles):
                return True
    return False


def quoted_columns(df: pl.DataFrame) -> frozenset[str]:
    """String columns of df with a value holding a double quote or a backslash.

    A column whose values are all longer than INLINE_BYTES has every value's bytes in its data
    buffers, which are scanned whole; one whose values all fit in INLINE_BYTES has them in its
    views, scanned whole likewise. A column with both, or whose buffers hold a needle, is checked
    value by value with a regex that the regex engine runs as memchr2. Control characters are looked for afterwards, in the
    rendered text (_has_control_bytes).
    """
    strings = _strings(df)
    if not strings or not df.height:
        return frozenset()
    text = {n: pl.col(n).cast(pl.String) for n in strings}
    lengths = df.select(pl.concat_list(c.str.len_bytes().min(), c.str.len_bytes().max()) for c in text.values()).row(0)
    per_value = []
    for name, (low, high) in zip(strings, lengths):
        if low is None:  # only nulls
            continue
        if df.schema[name] == pl.String and (low > INLINE_BYTES or high <= INLINE_BYTES) \
                and not _buffers_hold(df[name], b'"\\', views=high <= INLINE_BYTES):
            continue
        per_value.append(name)
    if not per_value:
        return frozenset()
    flags = df.select(text[n].str.contains(QUOTE_OR_BACKSLASH).any() for n in per_value).row(0)
    return frozenset(n for n, f in zip(per_value, flags) if f)


def _has_control_bytes(text: pl.Series) -> bool:
    """Whether any rendered row may hold a raw byte below 0x20 (conservative: it may say yes
    for bytes no row uses). Reads polars' buffers in place: no copy, one SIMD min per buffer."""
    if text.len() == 0:
        return False
    if text.str.len_bytes().min() <= INLINE_BYTES:
        return True  # short strings sit inside the views, not in the data buffers checked below
    arr = text.to_arrow(compat_level=pl.CompatLevel.newest())
    for chunk in arr.chunks if isinstance(arr, pa.ChunkedArray) else [arr]:
        for buf in chunk.buffers()[2:]:
            if buf is not None and buf.size and pc.min(pa.Array.from_buffers(pa.uint8(), buf.size, [None, buf])).as_py() < 0x20:
                return True
    return False


def encode_frame(df: pl.DataFrame, quoted: frozenset[str] | None = None) -> tuple[pl.Series, pl.Series]:
    """JSON text of every row of df and its key (unique_id as text, or null), as polars Series.
    `quoted`: quoted_columns() of df or of a frame that df is a slice of (computed if None)."""
    strings = _strings(df)
    key_col = next((n for n in df.columns if n.lower() == KEY_COLUMN), None)
    key = pl.col(key_col).cast(pl.String) if key_col else pl.lit(None, pl.String)
    escape = quoted_columns(df) if quoted is None else quoted
    out = df.select(v=render(df, escape), k=key)
    if len(escape) < len(strings) and _has_control_bytes(out["v"]):
        flags = df.select(pl.col(n).cast(pl.String).str.contains(NEEDS_ESCAPE).any() for n in strings).row(0)
        escape = frozenset(n for n, f in zip(strings, flags) if f)
        out = df.select(v=render(df, escape), k=key)
    return out["v"], out["k"]


def _as_lists(values: pl.Series, keys: pl.Series, as_bytes: bool) -> tuple[list, list]:
    if as_bytes:  # a view cast; bytes need no UTF-8 validation, so they are made faster than str
        values, keys = values.cast(pl.Binary), keys.cast(pl.Binary)
    return values.to_list(), keys.to_list()


def _wide_decimals(schema: pa.Schema) -> bool:
    # Snowflake's NUMBER stops at 38 digits; wider decimals only come from files written by
    # something else, and go through pyarrow as strings.
    return any(pa.types.is_decimal(f.type) and f.type.precision > 38 for f in schema)


def _frame(table: pa.Table) -> pl.DataFrame:
    for i, f in enumerate(table.schema):
        if pa.types.is_decimal(f.type) and f.type.precision > 38:
            table = table.set_column(i, f.name, table.column(i).cast(pa.string()))
    return pl.from_arrow(table)


def parquet_batches(path: str, batch_rows: int, *, as_bytes: bool = False,
                    first_batch_rows: int | None = None) -> Iterator[tuple[list, list]]:
    """(values, keys) of a local parquet file, at most batch_rows at a time, in row order.

    Decoded one row group at a time (staged chunks have 65,536-row groups, see stage.py), so
    memory holds one row group's columns and one batch's JSON. first_batch_rows: a smaller
    first batch, so whoever waits for it (the producer, idle until then) starts sooner.
    """
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
            quoted = quoted_columns(df)  # once per row group: its slices share its buffers
            start = 0
            while start < n:
                rows = batch_rows if first_batch_rows is None else min(first_batch_rows, batch_rows)
                first_batch_rows = None
                yield _as_lists(*encode_frame(df.slice(start, rows), quoted), as_bytes)
                start += rows


def encode_bytes(table: pa.Table) -> tuple[list[bytes], list[bytes | None]]:
    """JSON of every row and its key as UTF-8 bytes, what a Kafka producer sends as is."""
    return _as_lists(*encode_frame(_frame(table)), True)


def encode(table: pa.Table) -> tuple[list[str], list[str | None]]:
    """JSON text of every row and its Kafka key (unique_id), in row order, as Python lists."""
    return _as_lists(*encode_frame(_frame(table)), False)
