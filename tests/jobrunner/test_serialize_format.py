"""The vectorized encoder against a per-row reference written from docs/message-format.md."""

from __future__ import annotations

import base64
import decimal
import json
import math
import random
import struct
from datetime import UTC, date, datetime, time, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobrunner import serialize

MAX_SAFE = 2**53 - 1
EPOCH = datetime(1970, 1, 1)


def ref_float(x: float) -> str:
    """The documented float layout: the shortest digits that parse back (Python's repr has them),
    in plain notation for 1e-5 <= |x| < 1e16, else d.ddde+X / d.ddde-X."""
    if x == 0:
        return repr(x)
    r = repr(abs(x))
    mant, _, e = r.partition("e")
    whole, _, frac = mant.partition(".")
    digits = (whole + frac).lstrip("0").rstrip("0") or "0"
    exp = int(e or 0) + (len(whole.lstrip("0")) - 1 if whole.strip("0") else -(len(frac) - len(frac.lstrip("0")) + 1))
    sign = "-" if x < 0 else ""
    if 1e-5 <= abs(x) < 1e16:
        if exp >= 0:
            return f"{sign}{digits[: exp + 1].ljust(exp + 1, '0')}.{digits[exp + 1 :] or '0'}"
        return f"{sign}0.{'0' * (-exp - 1)}{digits}"
    return f"{sign}{digits[0]}{'.' + digits[1:] if len(digits) > 1 else ''}e{'+' if exp >= 0 else '-'}{abs(exp)}"


def ref_timestamp(micros: int) -> str:
    t = EPOCH + timedelta(microseconds=micros)
    return t.strftime("%Y-%m-%dT%H:%M:%S") + (f".{t.microsecond:06d}" if t.microsecond else "") + "Z"


def ref_value(v, t: pa.DataType) -> str:
    if v is None:
        return "null"
    if pa.types.is_floating(t):
        return ref_float(float(v)) if math.isfinite(v) else "null"
    if pa.types.is_boolean(t):
        return "true" if v else "false"
    if pa.types.is_integer(t):
        return f'"{v}"' if abs(v) > MAX_SAFE else str(v)
    if pa.types.is_decimal(t):
        return json.dumps(format(v, "f"))  # pyarrow gives Decimals with the column's scale: the exact digits
    if pa.types.is_timestamp(t):
        return json.dumps(ref_timestamp(v))
    if pa.types.is_date(t):
        return json.dumps(v.isoformat())
    if pa.types.is_time(t):
        return json.dumps(v.strftime("%H:%M:%S") + (f".{v.microsecond:06d}" if v.microsecond else ""))
    if pa.types.is_binary(t):
        return json.dumps(base64.b64encode(v).decode())
    return json.dumps(v, ensure_ascii=False)


def reference(table: pa.Table) -> tuple[list[str], list[str | None]]:
    """json.dumps-style encoding, one row at a time, following docs/message-format.md."""
    cols = []
    for f, col in zip(table.schema, table.columns, strict=True):
        if pa.types.is_timestamp(f.type):  # instants as epoch micros, nanoseconds truncated toward zero
            ints = col.cast(pa.int64()).to_pylist()
            per = {"s": 1_000_000, "ms": 1000, "us": 1, "ns": 1}[f.type.unit]
            vals = [None if i is None else (int(i / 1000) if f.type.unit == "ns" else i * per) for i in ints]
        else:
            vals = col.to_pylist()
        cols.append(vals)
    names = [json.dumps(f.name.lower(), ensure_ascii=False) for f in table.schema]
    out = []
    for row in zip(*cols, strict=True):
        out.append(
            "{"
            + ",".join(f"{n}:{ref_value(v, f.type)}" for n, v, f in zip(names, row, table.schema, strict=True))
            + "}"
        )
    keys = [None] * table.num_rows
    for f, vals in zip(table.schema, cols, strict=True):
        if f.name.lower() == "unique_id":
            keys = [None if v is None else str(v) for v in vals]
    return out, keys


def every_type() -> pa.Table:
    utc = UTC
    n = 12
    return pa.table(
        {
            "UNIQUE_ID": pa.array([f"0x{i:064x}-{i}" for i in range(n - 1)] + [None]),
            "plain": pa.array(["0xabc", "USD Coin", "", "x" * 40, None, "a b", "12", "-", "z", "y", "w", "v"]),
            "needs_escape": pa.array(
                [
                    'say "hi"',
                    "back\\slash",
                    "tab\there",
                    "nl\nx\r\b\f",
                    "\x00\x01\x1f\x7f",
                    "é ü 漢 😀 \u2028 /",
                    None,
                    "ok",
                    "{}",
                    "{0}",
                    "\u0085",
                    "'",
                ]
            ),
            "f": pa.array(
                [
                    1e21,
                    1e22,
                    1e-7,
                    1e-5,
                    0.1,
                    -0.0,
                    5e-324,
                    1.7976931348623157e308,
                    float("nan"),
                    float("inf"),
                    float("-inf"),
                    None,
                ]
            ),
            "f32": pa.array([0.1, 1.5, None, 3.4e38, -2.5, 0, 1, 2, 3, 4, 5, 6], pa.float32()),
            "i": pa.array([2**53, MAX_SAFE, -(2**53), -MAX_SAFE, 0, None, 2**63 - 1, -(2**63), 1, 2, 3, 4], pa.int64()),
            "u": pa.array([2**64 - 1, 2**53, MAX_SAFE, None, 0, 1, 2, 3, 4, 5, 6, 7], pa.uint64()),
            "i8": pa.array([1, -1, None, 127, -128, 0, 1, 2, 3, 4, 5, 6], pa.int8()),
            "i32": pa.array([2**31 - 1, -(2**31), None, 0, 1, 2, 3, 4, 5, 6, 7, 8], pa.int32()),
            "b": pa.array([True, False, None] + [True] * 9),
            "d": pa.array(
                [
                    decimal.Decimal("1.2"),
                    decimal.Decimal("-0.0001"),
                    decimal.Decimal("12345678901234567890.123456789"),
                    None,
                ]
                + [decimal.Decimal(i) for i in range(8)],
                pa.decimal128(38, 9),
            ),
            "d0": pa.array(
                [decimal.Decimal(10**37), decimal.Decimal(-5), None] + [decimal.Decimal(i) for i in range(9)],
                pa.decimal128(38, 0),
            ),
            "ts": pa.array(
                [
                    datetime(2024, 1, 1),
                    datetime(2024, 1, 1, 0, 0, 1, 500000),
                    None,
                    datetime(1960, 1, 1, 0, 0, 0, 1),
                    datetime(1969, 12, 31, 23, 59, 59, 999999),
                ]
                + [datetime(2024, 2, 29, 12)] * 7,
                pa.timestamp("us"),
            ),
            "ts_ns": pa.array(
                [-1500, 1500, None, -1_000_000_001, 0, 1_704_067_200_000_000_000, 999, -999, 1000, -1000, 7, 8],
                pa.timestamp("ns"),
            ),
            "ts_tz": pa.array(
                [
                    datetime(2024, 1, 1, tzinfo=utc),
                    datetime(2024, 1, 1, 0, 0, 1, 500000, tzinfo=utc),
                    None,
                    datetime(1960, 1, 1, tzinfo=utc),
                ]
                + [datetime(2000, 1, 1, tzinfo=utc)] * 8,
                pa.timestamp("us", "America/New_York"),
            ),
            "dt": pa.array([date(2024, 1, 2), date(1, 1, 1), None, date(9999, 12, 31)] + [date(2000, 1, 1)] * 8),
            "tm": pa.array(
                [time(1, 2, 3), time(1, 2, 3, 500000), None, time(23, 59, 59, 1)] + [time(0)] * 8, pa.time64("us")
            ),
            "bin": pa.array([b"\x00\xff", b"", None, b"abcd"] + [b"x"] * 8, pa.binary()),
            'we"ird {name}': pa.array(list(range(n)), pa.int64()),
            "nothing": pa.array([None] * n, pa.null()),
        }
    )


def check(table: pa.Table, got: tuple[list, list]) -> None:
    want_v, want_k = reference(table)
    values, keys = got
    assert len(values) == table.num_rows
    for i, (g, w) in enumerate(zip(values, want_v, strict=True)):
        assert g == w, f"row {i}"
        json.loads(g)  # valid JSON
    assert keys == want_k


def test_every_type_and_edge_case_matches_the_reference():
    t = every_type()
    check(t, serialize.encode(t))
    v, k = serialize.encode(t, as_bytes=True)
    assert [bytes(x).decode() for x in v] == serialize.encode(t)[0] and k[0] == t.column(0)[0].as_py().encode()


def test_each_escape_alone_is_found():
    # A batch where only one value needs escaping must still be escaped: the fast path pastes
    # strings as they are, so each trigger byte is tried on its own (short and long rows).
    for ch in ['"', "\\", "\x00", "\n", "\x1f"]:
        for pad in ("", "x" * 30):
            t = pa.table({"s": pa.array(["plain", pad + ch + pad, "also plain"]), "n": pa.array([1, 2, 3])})
            check(t, serialize.encode(t))


def test_random_floats_strings_and_ints_match_the_reference():
    rnd = random.Random(20261122)
    n = 3000
    floats = [struct.unpack("d", struct.pack("Q", rnd.getrandbits(64)))[0] for _ in range(n // 2)]
    floats += [rnd.uniform(-1, 1) * 10.0 ** rnd.randint(-12, 22) for _ in range(n - len(floats))]
    alphabet = 'abcXYZ019 "\\/\t\n\x00\x01\x1f\x7féü漢😀\u2028{}'
    strings = [
        "".join(rnd.choice(alphabet) for _ in range(rnd.randint(0, 20))) if rnd.random() < 0.9 else None
        for _ in range(n)
    ]
    ints = [
        rnd.choice([rnd.randint(-(2**63), 2**63 - 1), rnd.randint(-(2**54), 2**54), rnd.randint(-1000, 1000)])
        for _ in range(n)
    ]
    t = pa.table({"f": pa.array(floats), "s": pa.array(strings), "i": pa.array(ints, pa.int64())})
    check(t, serialize.encode(t))


def test_parquet_batches_follow_row_order_across_row_groups_and_batches(tmp_path):
    t = every_type()
    big = pa.concat_tables([t] * 40)  # 480 rows: row groups of 100, batches of 33
    path = tmp_path / "chunk.parquet"
    pq.write_table(big, path, row_group_size=100)
    back = pq.read_table(path)  # what the file holds (parquet keeps tz, units)
    values, keys, sizes = [], [], []
    for v, k, nbytes in serialize.parquet_batches(str(path), 33, as_bytes=True):
        assert nbytes == sum(map(len, v))
        values += [bytes(x).decode() for x in v]
        keys += [None if x is None else x.decode() for x in k]
        sizes.append(len(v))
    assert max(sizes) <= 33
    check(back, (values, keys))


def test_wide_decimals_keep_their_digits(tmp_path):
    t = pa.table({"w": pa.array([decimal.Decimal("1" * 45 + ".25"), None], pa.decimal256(50, 2))})
    path = tmp_path / "wide.parquet"
    pq.write_table(t, path)
    values, _, _ = next(serialize.parquet_batches(str(path), 10))
    assert values == ['{"w":"' + "1" * 45 + '.25"}', '{"w":null}']


def test_each_escape_is_found_in_short_and_long_values(tmp_path):
    # Values of up to 12 bytes sit inside their Arrow string views, longer ones in data buffers
    # (in memory from Arrow, in pages read from parquet): _rows reads both.
    for ch in ['"', "\\", "\x00", "\n", "\x1f"]:
        for width in (40, 5, 34, 92):  # 34 and 92: a parquet length prefix holding `"` or `\`
            t = pa.table({"s": pa.array(["a" * width, "b" * (width - 1) + ch, "c" * width]), "n": pa.array([1, 2, 3])})
            check(t, serialize.encode(t))
            path = tmp_path / f"{ord(ch)}-{width}.parquet"
            pq.write_table(t, path, use_dictionary=False)
            values = [
                bytes(x).decode() for v, _, _ in serialize.parquet_batches(str(path), 2, as_bytes=True) for x in v
            ]
            check(pq.read_table(path), (values, [None] * 3))


def test_a_smaller_first_batch_keeps_every_row_in_order(tmp_path):
    t = every_type()
    path = tmp_path / "chunk.parquet"
    pq.write_table(pa.concat_tables([t] * 10), path, row_group_size=50)
    batches = list(serialize.parquet_batches(str(path), 33, first_batch_rows=5))
    assert [len(v) for v, _, _ in batches][:3] == [5, 33, 12]
    check(pq.read_table(path), ([x for v, _, _ in batches for x in v], [x for _, k, _ in batches for x in k]))


def test_the_row_assembler_refuses_more_rows_than_a_column_has():
    import polars as pl

    from beam_jobrunner import _rows

    arr = pl.Series(["a", "b"]).to_arrow(compat_level=pl.CompatLevel.newest())
    spec = serialize._view_spec(arr, b"{", serialize.STRING)
    assert _rows.rows([spec], b"}", 2, True) == (['{"a"}', '{"b"}'], 10)
    with pytest.raises(ValueError, match="3 rows asked of a column of 2"):
        _rows.rows([spec], b"}", 3, False)
    with pytest.raises(TypeError, match="not string_view"):
        serialize._view_spec(pa.array([1, 2]), b"", serialize.RAW)


def test_a_message_keeps_its_text_while_later_batches_reuse_the_buffers():
    # Kafka's messages are views of one buffer per batch, and buffers are reused: one message
    # kept past its batch must not see the next batches' text.
    t = pa.table({"s": pa.array([f"row {i} é" for i in range(1000)]), "n": pa.array(range(1000))})
    first, _ = serialize.encode(t, as_bytes=True)
    kept = first[7]
    del first
    for _ in range(6):  # more batches than the pool holds buffers
        other, _ = serialize.encode(
            pa.table({"s": pa.array(["x" * 50] * 1000), "n": pa.array(range(1000))}), as_bytes=True
        )
        del other
    assert bytes(kept) == '{"s":"row 7 é","n":7}'.encode() and len(kept) == len(bytes(kept))
    view = memoryview(kept)
    assert view.readonly and view.tobytes() == bytes(kept)
    with pytest.raises(TypeError):
        view.cast("B")[0] = 0  # read-only


def test_timestamps_rendered_in_c_match_polars_own_text_over_the_whole_range():
    # _rows writes microsecond timestamps of the years 1-9999 itself; polars' strftime (which
    # wrote them before) is the reference, here and beyond that range, where it still writes them.
    import polars as pl

    rnd = random.Random(20261123)
    lo, hi = serialize.MIN_MICROS, serialize.MAX_MICROS
    edges = [
        lo,
        lo + 1,
        hi,
        hi - 999_999,
        0,
        -1,
        1,
        -86_400_000_000,
        951_782_400_000_000,  # 2000-02-29
        -2_203_891_200_000_000,
        -30_610_224_000_000_001,
    ]  # 1900-03-01; year 999, one microsecond before 1000
    whole = [rnd.randint(lo // 1_000_000, hi // 1_000_000) * 1_000_000 for _ in range(2000)]
    micros = edges + whole + [rnd.randint(lo, hi) for _ in range(2000)]
    for values in (micros, [hi + 1, lo - 1, 0, hi * 2]):  # the second: years beyond 9999 and before 1
        s = pl.Series("t", values, pl.Int64).cast(pl.Datetime("us"))
        want = (
            pl.select(
                pl.when(s.dt.epoch("us") % 1_000_000 == 0)
                .then(s.dt.strftime("%Y-%m-%dT%H:%M:%SZ"))
                .otherwise(s.dt.strftime("%Y-%m-%dT%H:%M:%S%.6fZ"))
            )
            .to_series()
            .to_list()
        )
        values_out, _ = serialize.encode(pa.table({"t": pa.array(values, pa.timestamp("us"))}))
        assert values_out == [f'{{"t":"{w}"}}' for w in want]


def test_every_int64_is_written_as_json_would_read_it():
    edges = [
        0,
        1,
        -1,
        9,
        10,
        -10,
        2**53 - 1,
        2**53,
        -(2**53 - 1),
        -(2**53),
        2**63 - 1,
        -(2**63),
        10**18,
        -(10**18),
        999_999_999_999_999_999,
    ]
    rnd = random.Random(7)
    ints = edges + [rnd.randint(-(2**63), 2**63 - 1) >> rnd.randint(0, 63) for _ in range(3000)]
    values, _ = serialize.encode(pa.table({"i": pa.array(ints, pa.int64())}))
    assert values == [f'{{"i":"{v}"}}' if abs(v) > MAX_SAFE else f'{{"i":{v}}}' for v in ints]
