"""spec.transforms in the sandbox (beam_jobrunner.transform, js_sandbox): the returned-value
rules, the keys, the batching, and hostile scripts, each refused with a clear error while the
process that asked (a worker) goes on."""

from __future__ import annotations

import json
import os
import time

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from beam_jobrunner import _rows, serialize
from beam_jobrunner.transform import Limits, Transformer, TransformError, transform_rows

ROWS = [
    {"unique_id": f"0x{i:04x}-{i % 3}", "token": ["USDC", "USDT", "WETH"][i % 3], "amount": i * 1.5, "block": 100 + i}
    for i in range(12)
]
KEYS = [r["unique_id"] for r in ROWS]


def array(rows=ROWS) -> bytes:
    return ("[" + ",".join(json.dumps(r, separators=(",", ":")) for r in rows) + "]").encode()


def run(scripts, rows=ROWS, *, as_bytes=False, chunk=7, first_row=0, **limits):
    t = Transformer([scripts] if isinstance(scripts, str) else scripts, Limits(**limits))
    try:
        t.start()
        keys = [r.get("unique_id") for r in rows]
        if as_bytes:  # as serialize gives them to the Kafka sink
            keys = [None if k is None else k.encode() for k in keys]
        return t.apply(array(rows), keys, chunk=chunk, first_row=first_row, as_bytes=as_bytes)
    finally:
        t.close()


def fails(scripts, rows=ROWS, **limits) -> str:
    with pytest.raises(TransformError) as e:
        run(scripts, rows, **limits)
    assert e.value.exit_code == 2, "a transform's failure is permanent"
    return str(e.value)


# --- the returned-value rules -----------------------------------------------------------------


def test_identity_keeps_every_row_its_text_and_its_key():
    values, keys, nbytes = run("function transform(row) { return row; }")
    assert [json.loads(v) for v in values] == ROWS and keys == KEYS
    assert nbytes == sum(len(v.encode()) for v in values)


def test_the_returned_object_is_the_message_null_and_undefined_drop_the_row():
    values, keys, _ = run(
        """function transform(row) {
             if (row.token === "USDT") return null;
             if (row.token === "WETH") return undefined;
             row.doubled = row.amount * 2;
             delete row.block;
             return row;
           }"""
    )
    want = [r for r in ROWS if r["token"] == "USDC"]
    assert keys == [r["unique_id"] for r in want]
    assert [json.loads(v) for v in values] == [
        {"unique_id": r["unique_id"], "token": "USDC", "amount": r["amount"], "doubled": r["amount"] * 2} for r in want
    ]


def test_an_array_emits_its_rows_with_keys_numbered_by_position():
    values, keys, _ = run("function transform(row) { return [row, null, {id: row.unique_id, copy: true}]; }", ROWS[:2])
    assert keys == [
        f"{ROWS[0]['unique_id']}#0",
        f"{ROWS[0]['unique_id']}#2",
        f"{ROWS[1]['unique_id']}#0",
        f"{ROWS[1]['unique_id']}#2",
    ]
    assert json.loads(values[1]) == {"id": ROWS[0]["unique_id"], "copy": True}
    # an empty array drops the row, an array of one still numbers it
    values, keys, _ = run("const transform = (row) => row.token === 'USDC' ? [] : [row];", ROWS[:3])
    assert keys == [f"{ROWS[1]['unique_id']}#0", f"{ROWS[2]['unique_id']}#0"]


def test_transforms_apply_in_order_and_each_array_adds_its_number():
    values, keys, _ = run(
        [
            "function transform(r) { return [r, {...r, half: true}]; }",
            "function transform(r) { return r.half ? [r, r] : r; }",
            "function transform(r) { r.step3 = true; return r.token === 'USDT' ? null : r; }",
        ],
        ROWS[:2],
    )
    u = ROWS[0]["unique_id"]
    assert keys == [f"{u}#0", f"{u}#1#0", f"{u}#1#1"], "row 1 (USDT) is dropped by the third"
    assert all(json.loads(v)["step3"] for v in values)


def test_declarations_of_two_scripts_do_not_collide():
    values, _, _ = run(
        [
            "const RATE = 2; function transform(r) { r.a = RATE; return r; }",
            "const RATE = 3; function transform(r) { r.b = RATE; return r; }",
        ],
        ROWS[:1],
    )
    assert json.loads(values[0])["a"] == 2 and json.loads(values[0])["b"] == 3


@pytest.mark.parametrize(
    ("ret", "named"),
    [
        ("'a string'", "a string"),
        ("42", "a number"),
        ("true", "a boolean"),
        ("[row, 'x']", "an array whose element 1 is a string"),
        ("[[row]]", "an array whose element 0 is an array"),
        ("new Map()", "an object of class Map"),
        ("Promise.resolve(row)", "an object of class Promise"),
        ("() => row", "a function"),
    ],
)
def test_anything_else_is_an_error_naming_the_row(ret, named):
    message = fails(f"function transform(row) {{ return row.block === 105 ? {ret} : row; }}")
    assert f"transform 1 of 1 returned {named} on chunk 7, row with unique_id {ROWS[5]['unique_id']}" in message
    assert "null or undefined to drop it, or an array of rows" in message


def test_a_row_json_cannot_write_is_an_error():
    message = fails("function transform(row) { row.big = 10n; return row; }")
    assert "returned a row JSON cannot write" in message and "BigInt" in message
    message = fails("function transform(row) { return {toJSON() { return 'text'; }}; }")
    assert "returned a row JSON cannot write" in message


def test_bytes_for_the_kafka_sink_str_for_the_others():
    values, keys, nbytes = run("function transform(row) { row.t = 'ünïcode ✓'; return row; }", ROWS[:3], as_bytes=True)
    assert all(isinstance(v, _rows.Message) for v in values) and all(isinstance(k, bytes) for k in keys)
    assert json.loads(bytes(values[0]))["t"] == "ünïcode ✓" and nbytes == sum(map(len, values))
    assert keys[0] == ROWS[0]["unique_id"].encode()
    values, keys, nbytes = run("function transform(row) { row.t = 'ünïcode ✓'; return row; }", ROWS[:3])
    assert all(isinstance(v, str) for v in values) and all(isinstance(k, str) for k in keys)
    assert nbytes == sum(len(v.encode()) for v in values)


def test_rows_without_unique_id_keep_no_key_even_multiplied():
    rows = [{"a": i} for i in range(3)]
    values, keys, _ = run("function transform(r) { return [r, r]; }", rows)
    assert len(values) == 6 and keys == [None] * 6


# --- determinism, and the batching ------------------------------------------------------------


def test_no_clock_and_a_random_generator_seeded_by_the_row():
    assert "the current time is not available in a transform" in fails(
        "function transform(r) { r.t = Date.now(); return r; }"
    )
    assert "the current time is not available" in fails(
        "function transform(r) { r.t = new Date().toISOString(); return r; }"
    )
    assert "the current time is not available" in fails("function transform(r) { r.t = Date(); return r; }")
    values, _, _ = run("function transform(r) { r.t = new Date(r.block * 1000).toISOString(); return r; }", ROWS[:1])
    assert json.loads(values[0])["t"] == "1970-01-01T00:01:40.000Z"
    script = "function transform(r) { r.x = Math.random(); r.y = Math.random(); return r; }"
    a = [json.loads(v) for v in run(script)[0]]
    b = [json.loads(v) for v in run(script)[0]]
    assert a == b, "the same rows get the same numbers on a rerun"
    assert len({r["x"] for r in a}) == len(a) and all(0 <= r["x"] < 1 and r["x"] != r["y"] for r in a)
    # seeded by the row's place in its chunk, not by the batch it came in
    later = [json.loads(v) for v in run(script, ROWS[4:], first_row=4)[0]]
    assert later == a[4:]
    other_chunk = [json.loads(v) for v in run(script, chunk=8)[0]]
    assert other_chunk[0]["x"] != a[0]["x"]


def chunk_file(tmp_path, n: int) -> str:
    path = str(tmp_path / "chunk.parquet")
    table = pa.table(
        {
            "unique_id": [f"u{i}" for i in range(n)],
            "token": [["USDC", "USDT"][i % 2] for i in range(n)],
            "amount": [i * 0.5 for i in range(n)],
        }
    )
    pq.write_table(table, path, row_group_size=1000)
    return path


def test_one_engine_call_per_batch_and_the_same_rows_whatever_the_batches(tmp_path, monkeypatch):
    """What transport does (EncodedBatches._work_transformed): every batch one JSON array, one
    call, the batches spread over the sandboxes; whatever the batches and the sandboxes, the
    same rows with the same keys in the same order."""
    from beam_jobrunner.transform import Sandbox

    path = chunk_file(tmp_path, 2500)
    script = "function transform(r) { if (r.token === 'USDT') return null; r.r = Math.random(); return [r, {id: r.unique_id}]; }"
    calls: list[int] = []
    real = Sandbox.send

    def counting(self, op, parts):
        if op == b"R":
            calls.append(self.proc.pid)
        return real(self, op, parts)

    monkeypatch.setattr(Sandbox, "send", counting)
    seen = []
    for batch_rows, sandboxes in ((7, 1), (1000, 2), (4096, 3), (300, 2)):
        calls.clear()
        t = Transformer([script], Limits(sandboxes=sandboxes)).start()
        try:
            out, out_keys = [], []
            for values, k, _ in t.stream(
                serialize.parquet_arrays(path, batch_rows, as_bytes=True), chunk=0, as_bytes=True
            ):
                out += values
                out_keys += k
            pids = t.sandbox_pids
        finally:
            t.close()
        # row groups of 1,000 rows: a batch never spans two
        assert len(calls) == sum(-(-min(1000, 2500 - g) // batch_rows) for g in range(0, 2500, 1000)), batch_rows
        assert set(calls) == set(pids[: len(calls)]) and len(pids) == sandboxes, "each sandbox in turn"
        assert len(out) == 2500 and out_keys[:4] == [b"u0#0", b"u0#1", b"u2#0", b"u2#1"]
        seen.append(([bytes(v) for v in out], out_keys))
    assert all(x == seen[0] for x in seen), "batching and sandboxes change nothing a destination sees"


def test_a_consumer_that_stops_early_leaves_no_batch_behind(tmp_path):
    path = chunk_file(tmp_path, 2500)
    t = Transformer(["function transform(r) { return r; }"], Limits(sandboxes=2)).start()
    try:
        out = t.stream(serialize.parquet_arrays(path, 100, as_bytes=False), chunk=0, as_bytes=False)
        next(out)
        out.close()  # batches still in the sandboxes: they are ended
        assert t.sandbox_pids == []
        values, keys, _ = t.apply(array(), KEYS, chunk=0, first_row=0, as_bytes=False)
        assert keys == KEYS and len(t.sandbox_pids) == 2, "started afresh"
    finally:
        t.close()


def test_a_transformer_compiles_once_and_serves_many_batches():
    t = Transformer(["let n = 0; function transform(r) { r.n = ++n; return r; }"], Limits(sandboxes=1)).start()
    try:
        pids = t.sandbox_pids
        for _ in range(3):
            t.apply(array(), KEYS, chunk=0, first_row=0, as_bytes=False)
        values, _, _ = t.apply(array(ROWS[:1]), KEYS[:1], chunk=0, first_row=0, as_bytes=False)
        assert t.sandbox_pids == pids and json.loads(values[0])["n"] == 3 * len(ROWS) + 1, (
            "one isolate: state carries over"
        )
    finally:
        t.close()


def test_preview_helper():
    assert transform_rows(None, ROWS[:2]) == ROWS[:2]

    class T:
        type, script = "v8", "function transform(r) { return r.token === 'USDC' ? null : {id: r.unique_id}; }"

    assert transform_rows([T()], ROWS[:3]) == [{"id": ROWS[1]["unique_id"]}, {"id": ROWS[2]["unique_id"]}]


# --- refused at compile time --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "complaint", "line", "column"),
    [
        ("function transform(r) {\n  return r +;\n}", "does not compile: SyntaxError: Unexpected token ';'", 2, 13),
        (
            "const x = ;\nfunction transform(r) { return r; }",
            "does not compile: SyntaxError: Unexpected token ';'",
            1,
            11,
        ),
        (
            "import fs from 'fs';\nfunction transform(r) { return r; }",
            "does not compile: SyntaxError: Cannot use import statement outside a module",
            1,
            1,
        ),
        ("function transform(r) {\n  return r;\n", "does not compile: SyntaxError", 3, 1),
        # One `}` too many closes the wrapper the script is compiled in; the error is still the script's.
        ("function transform(r) {\n  return r;\n  }}\n", "does not compile: SyntaxError: Unexpected token '}'", 3, 4),
        ("function transform(r) { return r; }}", "does not compile: SyntaxError: Unexpected token '}'", 1, 36),
        (
            "function transform(r) { return r; }\nthrow new Error('not ready');",
            "throws when it loads: Error: not ready",
            2,
            1,
        ),
        (
            "function transform(r) { return r; }\nrequire('fs');",
            "throws when it loads: ReferenceError: require is not defined",
            2,
            1,
        ),
    ],
)
def test_a_script_that_does_not_compile_names_its_line_and_column(script, complaint, line, column):
    with pytest.raises(TransformError) as e:
        Transformer(["function transform(r) { return r; }", script], Limits()).start()
    message = str(e.value)
    assert f"transform 2 of 2 {complaint}" in message, message
    assert f"at line {line}, column {column}" in message, message


def test_a_script_that_defines_no_transform_is_refused():
    with pytest.raises(TransformError, match="transform 1 of 1 defines no function named transform"):
        Transformer(
            ["// function transform(row) is only mentioned\nfunction transfrom(r) { return r; }"], Limits()
        ).start()


# --- hostile scripts: each fails the chunk with a clear error; this process goes on -----------


def test_an_infinite_loop_is_stopped_at_the_time_limit():
    t0 = time.monotonic()
    message = fails(
        "function transform(row) {\n  if (row.block === 103) { while (true) {} }\n  return row;\n}", timeout_s=1
    )
    assert time.monotonic() - t0 < 8
    assert "transform 1 of 1 ran past the time limit of 1 s per batch of up to 4096 rows on chunk 7" in message
    assert f"at row with unique_id {ROWS[3]['unique_id']}" in message


def test_a_2_gb_allocation_is_stopped_at_the_memory_limit_and_ends_the_sandbox_only():
    t = Transformer(
        ["function transform(row) { const a = new Array(2 ** 28).fill(0); return row; }"],
        Limits(memory_mib=64, timeout_s=60),  # V8 may take 15 s to give up: no time limit first
    )
    t.start()
    pid = t.sandbox_pids[0]
    with pytest.raises(TransformError) as e:
        t.apply(array(), KEYS, chunk=7, first_row=0, as_bytes=False)
    assert "ran past the memory limit of 64 MiB on chunk 7" in str(e.value), str(e.value)
    assert f"row with unique_id {ROWS[0]['unique_id']}" in str(e.value)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # V8 ended its process: the sandbox's, not this one
    # the next batch gets a fresh sandbox (a worker stops at the first failure; a preview may not)
    t.scripts = ["function transform(row) { return row; }"]
    assert len(t.apply(array(), KEYS, chunk=7, first_row=0, as_bytes=False)[0]) == len(ROWS)
    t.close()


def test_a_growing_heap_is_stopped_at_the_memory_limit_with_its_row():
    message = fails(
        "function transform(row) { const a = []; while (true) a.push({n: a.length, s: 'x'.repeat(64) + a.length}); }",
        memory_mib=64,
    )
    assert (
        f"transform 1 of 1 ran past the memory limit of 64 MiB on chunk 7, at row with unique_id {ROWS[0]['unique_id']}"
        in message
    )


def test_buffers_outside_the_heap_are_bounded_too():
    message = fails(
        "function transform(row) { const a = []; for (;;) a.push(new Uint8Array(100 * 2 ** 20).fill(1)); }",
        memory_mib=64,
    )
    assert "RangeError: Array buffer allocation failed at line 1, column" in message


@pytest.mark.parametrize(
    ("expression", "error"),
    [
        ("require('fs')", "ReferenceError: require is not defined"),
        ("process.env", "ReferenceError: process is not defined"),
        ("fetch('http://127.0.0.1/')", "ReferenceError: fetch is not defined"),
        ("setTimeout(() => 0, 1)", "TypeError: setTimeout is not a function"),
        ("new WebAssembly.Memory({initial: 1})", "ReferenceError: WebAssembly is not defined"),
        ("Atomics.wait(new Int32Array(4), 0, 0)", "ReferenceError: Atomics is not defined"),
        ("new SharedArrayBuffer(8)", "ReferenceError: SharedArrayBuffer is not defined"),
        ("new XMLHttpRequest()", "ReferenceError: XMLHttpRequest is not defined"),
        ("Deno.readTextFile('/etc/passwd')", "ReferenceError: Deno is not defined"),
    ],
)
def test_no_io_no_timers_no_modules(expression, error):
    message = fails(f"function transform(row) {{\n  const x = {expression};\n  return row;\n}}")
    assert (
        f"transform 1 of 1 threw on chunk 7, row with unique_id {ROWS[0]['unique_id']}: {error} at line 2, column"
        in message
    )


def test_dynamic_import_is_refused():
    # import() is syntax: it gives a Promise, rejected (no module loader), which is not a row
    assert "returned an object of class Promise" in fails("function transform(row) { return import('fs'); }")
    values, _, _ = run(
        "function transform(row) { import('fs').catch(() => 0); row.c = typeof console.log; return row; }", ROWS[:1]
    )
    assert json.loads(values[0])["c"] == "function", "console is there, and writes nowhere"


def test_a_throw_on_one_row_names_that_row_the_error_its_line_and_column():
    message = fails(
        """function transform(row) {
  if (row.token === "WETH") {
    throw new TypeError("no WETH here");
  }
  return row;
}"""
    )
    assert message == (
        f"transforms: transform 1 of 1 threw on chunk 7, row with unique_id {ROWS[2]['unique_id']}: "
        "TypeError: no WETH here at line 3, column 11"
    )
    message = fails("function transform(row) { if (row.block === 101) throw 'plain text'; return row; }")
    assert f"row with unique_id {ROWS[1]['unique_id']}: uncaught string: plain text (no line and column" in message


def test_unbounded_recursion_is_a_range_error_with_its_line():
    message = fails(
        "function deeper(n) {\n  return deeper(n + 1) + 1;\n}\nfunction transform(row) { return deeper(0); }"
    )
    assert "threw on chunk 7" in message and "RangeError: Maximum call stack size exceeded at line 2, column" in message


def test_the_sandbox_has_no_environment(monkeypatch):
    monkeypatch.setenv("BEAM_DEST_0_SASL_PASSWORD", "a-secret-value")
    t = Transformer(["function transform(r) { return r; }"], Limits()).start()
    try:
        with open(f"/proc/{t.sandbox_pids[0]}/environ", "rb") as f:
            environ = f.read()
    except PermissionError:  # not dumpable: only root reads it, which the test may not be
        environ = b""
    finally:
        t.close()
    assert b"a-secret-value" not in environ and b"BEAM_" not in environ


def test_a_batch_reaches_the_engine_as_the_json_array_of_its_messages(tmp_path):
    path = chunk_file(tmp_path, 2500)
    plain = list(serialize.parquet_batches(path, 700, as_bytes=False))
    arrays = list(serialize.parquet_arrays(path, 700, as_bytes=False))
    assert len(plain) == len(arrays)
    for (values, keys, _), (arr, arr_keys) in zip(plain, arrays, strict=True):
        assert bytes(arr).decode() == "[" + ",".join(values) + "]" and arr_keys == keys
    empty = serialize.encode_array(serialize.render(pl.DataFrame({"a": pl.Series([], dtype=pl.Int64)})), 0, 0, True)
    assert bytes(empty[0]) == b"[]" and empty[1] == []


def test_a_slow_destination_is_no_time_limit(tmp_path, monkeypatch):
    """The time limit is the script's: answers the sandboxes gave in time wait for a worker busy
    with a slow destination, however long."""
    from beam_jobrunner import transform

    monkeypatch.setattr(transform, "KILL_GRACE_S", 0.2)
    path = chunk_file(tmp_path, 2500)
    t = Transformer(["function transform(r) { return r; }"], Limits(timeout_s=0.3, sandboxes=2)).start()
    try:
        n = 0
        for values, _, _ in t.stream(serialize.parquet_arrays(path, 500, as_bytes=False), chunk=0, as_bytes=False):
            time.sleep(0.8)
            n += len(values)
        assert n == 2500
    finally:
        t.close()
