"""`beam-jobrunner preview` against fakesnow with the real connector, run as the operator runs it:
a PreviewSpec and the Snowflake env only (no staging URI, key or bucket). What a user reads in a
preview is checked against what a backfill of the same spec really stages and delivers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from jr_helpers import TABLE, TOKENS, Job, Run, expected_ids, managed

from beam_contract.preview import SAMPLE_ROW_MAX_CHARS, PreviewResult
from beam_contract.worker import TERMINATION_MESSAGE_MAX_BYTES, parse_failure
from beam_devstack.dataset import COLUMNS
from beam_devstack.substrate.kafka import consume_all

# The dataset's declared types as Snowflake describes them in a query's result.
SNOWFLAKE_TYPES = {
    "VARCHAR": "TEXT",
    "FLOAT": "FLOAT",
    "BIGINT": "NUMBER(38,0)",
    "TIMESTAMP_NTZ(9)": "TIMESTAMP_NTZ(9)",
}
TABLE_COLUMNS = [{"name": c, "type": SNOWFLAKE_TYPES[t]} for c, t in COLUMNS]
RESULT_MAX_BYTES = 3800  # preview.RESULT_MAX_BYTES: the budget the worker promises, with margin
PASSWORD = "pr3view-Secret-pw"  # fakesnow takes any password; it must show up nowhere


def preview(tmp_path: Path, source, spec: dict, **env) -> Run:
    """The worker as the operator's preview Job runs it: its env has no staging URI, key or
    bucket, and its TMPDIR must still be empty afterwards (a preview writes no files)."""
    sf = source.endpoints()
    run_id = uuid.uuid4().hex[:8]
    tmp = tmp_path / f"tmp-{run_id}"
    tmp.mkdir()
    term = tmp_path / f"termination-{run_id}"
    e = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        "TMPDIR": str(tmp),
        "BEAM_SPEC": json.dumps(spec),
        "BEAM_JOB_ID": str(uuid.uuid4()),
        "BEAM_NAMESPACE": "test-ns",
        "BEAM_BACKFILL": f"preview-{run_id}",
        "BEAM_CONNECT_TIMEOUT_S": "10",
        "BEAM_SNOWFLAKE_ACCOUNT": sf["account"],
        "BEAM_SNOWFLAKE_USER": sf["user"],
        "BEAM_SNOWFLAKE_PASSWORD": PASSWORD,
        "BEAM_SNOWFLAKE_HOST": sf["host"],
        "BEAM_SNOWFLAKE_PORT": str(sf["port"]),
        "BEAM_SNOWFLAKE_PROTOCOL": sf["protocol"],
        "BEAM_SNOWFLAKE_DATABASE": "base",
        "BEAM_SNOWFLAKE_SCHEMA": "assets",
        "TERMINATION_MESSAGE_PATH": str(term),
        **{k: str(v) for k, v in env.items()},
    }
    p = subprocess.run(
        [sys.executable, "-m", "beam_jobrunner", "preview"], env=e, capture_output=True, text=True, timeout=120
    )
    message = term.read_text() if term.exists() else ""
    assert len(message.encode()) <= TERMINATION_MESSAGE_MAX_BYTES
    assert PASSWORD not in p.stderr + p.stdout + message
    assert list(tmp.iterdir()) == [], "a preview writes no files"
    return Run(p.returncode, parse_failure(message)[0], p.stderr, message)


def sample_of(got: dict) -> list[str]:
    """The sample rows of a result: they travel compressed (PreviewResult.sample_z)."""
    return PreviewResult.model_validate(got).sample()


def ok(r: Run) -> dict:
    assert r.code == 0, r.stderr[-3000:]
    assert len(r.termination.encode()) <= RESULT_MAX_BYTES and "\n" not in r.termination
    return r.json


def source_spec(window: dict, **kw) -> dict:
    return {"table": TABLE, "backfill_window": window, **kw}


def backfill(source: dict, topic: str = "unused") -> dict:
    """The backfill the preview previews: its source half plus a name and a destination."""
    src = {k: v for k, v in source.items() if k != "sample_rows"}
    return {"job_name": "p", **src, "destinations": [{"type": "kafka", "name": topic}]}


def delivered(tmp_path, source, gcs, kafka, spec: dict) -> dict[str, str]:
    """unique_id -> the message a Kafka destination got, for a real backfill of `spec`."""
    topic = f"preview-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, backfill(spec, topic), snowflake=source, gcs=gcs, kafka=kafka)
    job.transport_all(job.stage().json["num_chunks"])
    return {m.key().decode(): m.value().decode() for m in consume_all(kafka.bootstrap, managed(topic))}


BLOCKS = {"partition_key": "block", "start": 1000, "end": 2000}
HOURS = {"partition_key": "block_timestamp", "start": "2024-01-01T01:00:00", "end": "2024-01-01T03:00:00Z"}


@pytest.mark.parametrize(
    "window, filter, expected",
    [
        (BLOCKS, None, {"blocks": (1000, 2000)}),
        (
            BLOCKS,
            {"column": "token_symbol", "values": ["UNI'", "USDC"]},
            {"blocks": (1000, 2000), "tokens": {TOKENS[0], TOKENS[3]}},
        ),
        (HOURS, None, {"start": "2024-01-01 01:00:00", "end": "2024-01-01 03:00:00"}),
        (
            HOURS,
            {"column": "token_address", "values": TOKENS[1:3]},
            {"start": "2024-01-01 01:00:00", "end": "2024-01-01 03:00:00", "tokens": set(TOKENS[1:3])},
        ),
    ],
    ids=["blocks", "blocks-filtered", "hours", "hours-filtered"],
)
def test_the_count_is_what_staging_exports(tmp_path, source, bucket, gcs, rows, window, filter, expected):
    from datetime import datetime

    spec = source_spec(window, **({"filter": filter} if filter else {}))
    r = preview(tmp_path, source, spec)
    got = ok(r)
    if "start" in expected:
        expected = {
            **expected,
            "start": datetime.fromisoformat(expected["start"]),
            "end": datetime.fromisoformat(expected["end"]),
        }
    want = len(expected_ids(rows, **expected))
    assert want > 0
    staged = Job(tmp_path, backfill(spec), snowflake=source, gcs=gcs).stage().json
    assert got["num_rows"] == staged["num_rows"] == want
    assert got["columns"] == TABLE_COLUMNS
    assert got["bytes_per_row"] > 0
    # The one line a user reads in the log, with the counts.
    assert f"preview: {want:,} rows in the window, " in r.stderr
    assert f"bytes per row measured on {min(want, 1000)} rows, in " in r.stderr


# Short rows (under SAMPLE_ROW_MAX_CHARS) with what the format escapes: quotes, non-ASCII, floats
# past 2^53, null, timestamps. The projection's order is not the table's, and it leaves out the
# partition column the sample is ordered by.
PROJECTION = ["unique_id", "block_timestamp", "token_name", "token_symbol", "raw_amount", "usd_amount", "log_index"]


def test_the_sample_is_what_a_destination_receives(tmp_path, source, bucket, gcs, kafka, rows):
    spec = source_spec({"partition_key": "block", "start": 1000, "end": 1300}, columns=PROJECTION, sample_rows=10)
    got = ok(preview(tmp_path, source, spec))
    assert got["num_rows"] == 300
    assert got["columns"] == [{"name": c, "type": SNOWFLAKE_TYPES[dict(COLUMNS)[c]]} for c in PROJECTION]
    first = expected_ids(rows, blocks=(1000, 1010))  # the window's first rows, in block order
    sent = delivered(tmp_path, source, gcs, kafka, spec)
    assert len(sent) == 300
    assert sample_of(got) == [sent[i] for i in first], "byte for byte the messages Kafka got"
    assert got["sample_truncated"] is False and got["columns_truncated"] is False
    assert list(json.loads(sample_of(got)[0])) == PROJECTION
    assert any("Ünicode ✓" in s for s in sample_of(got)) and any('\\"Ether\\"' in s for s in sample_of(got))


EVEN_BLOCKS_LABELLED = {
    "type": "v8",
    "script": "function transform(row) {\n  if (row.block_number % 2) return null;\n"
    '  row.label = row.token_symbol + "#" + row.block_number;\n  return row;\n}\n',
}


def test_with_transforms_the_sample_is_what_they_deliver(tmp_path, source, bucket, gcs, kafka, rows):
    spec = source_spec(
        {"partition_key": "block", "start": 1000, "end": 1300}, transforms=[EVEN_BLOCKS_LABELLED], sample_rows=5
    )
    got = ok(preview(tmp_path, source, spec))
    assert got["num_rows"] == 300, "the count is of the window: what staging exports"
    sent = delivered(tmp_path, source, gcs, kafka, spec)
    assert len(sent) == 150
    kept = [i for i in expected_ids(rows, blocks=(1000, 1010)) if i in sent]
    assert len(kept) == 5
    assert sample_of(got) == [sent[i] for i in kept], "byte for byte the messages Kafka got"
    first = json.loads(sample_of(got)[0])
    assert first["label"] == f"{first['token_symbol']}#{first['block_number']}"


def test_a_transform_that_fails_fails_the_preview_with_transports_message(tmp_path, source):
    window = {"partition_key": "block", "start": 1000, "end": 1300}
    throws = {
        "type": "v8",
        "script": "function transform(row) {\n  if (row.block_number === 1003) row.x.y = 1;\n  return row;\n}",
    }
    r = preview(tmp_path, source, source_spec(window, transforms=[throws]))
    assert r.code == 2, r.stderr[-2000:]
    assert r.message.startswith("transforms: transform 1 of 1 threw on chunk 0, row with unique_id "), r.message
    assert "TypeError: Cannot set properties of undefined (setting 'y') at line 2, column 42" in r.message, r.message

    # A script that does not compile is refused before anything connects: here to nothing at all.
    from beam_devstack.substrate.proc import free_port

    broken = {"type": "v8", "script": "function transform(row) {\n  return row +;\n}"}
    r = preview(tmp_path, source, source_spec(window, transforms=[broken]), BEAM_SNOWFLAKE_PORT=free_port())
    assert r.code == 2, r.stderr[-2000:]
    assert (
        r.message
        == "transforms: transform 1 of 1 does not compile: SyntaxError: Unexpected token ';' at line 2, column 15"
    )


def test_whole_rows_travel_compressed_and_what_does_not_fit_is_left_out(tmp_path, source, bucket, gcs, kafka, rows):
    spec = source_spec({"partition_key": "block", "start": 1000, "end": 1300}, sample_rows=10)
    got = ok(preview(tmp_path, source, spec))
    assert got["columns"] == TABLE_COLUMNS
    sent = delivered(tmp_path, source, gcs, kafka, spec)
    first = [sent[i] for i in expected_ids(rows, blocks=(1000, 1010))]
    assert sum(len(m) for m in first[:5]) > 4096, "five of the dataset's rows would not fit uncompressed"
    assert list(json.loads(first[0])) == [c["name"] for c in TABLE_COLUMNS], "columns in the order delivered"
    n = len(sample_of(got))
    assert n >= 5, "compressed, more whole rows fit than the termination message holds as text"
    assert sample_of(got) == first[:n], "whole rows, byte for byte the messages Kafka got"
    assert got["sample_truncated"] is (n < 10) and got["columns_truncated"] is False


def test_long_non_ascii_values_are_cut_by_characters_and_fit_in_bytes(tmp_path, source):
    """Escaped in the termination line, "✓" takes 6 bytes: the budget counts bytes."""
    with source.connect("base", "assets") as conn:
        cur = conn.cursor()
        cur.execute("CREATE OR REPLACE TABLE base.assets.long_values (block_number BIGINT, note VARCHAR)")
        note = '✓"' * 3000
        values = ", ".join(f"({5 + i}, '{note}')" for i in range(20))
        cur.execute(f"INSERT INTO base.assets.long_values VALUES {values}")
    spec = {"table": "base.assets.long_values", "backfill_window": {"partition_key": "block", "start": 0, "end": 100}}
    got = ok(preview(tmp_path, source, {**spec, "sample_rows": 10}))
    assert got["num_rows"] == 20
    assert got["columns"] == [{"name": "block_number", "type": "NUMBER(38,0)"}, {"name": "note", "type": "TEXT"}]
    assert 1 <= len(sample_of(got)) <= 10 and got["sample_truncated"] is True
    assert all(len(s) == SAMPLE_ROW_MAX_CHARS for s in sample_of(got)), "each 6,000-character row cut"
    assert sample_of(got)[0].startswith('{"block_number":5,"note":"✓\\"✓\\"')


def test_hundreds_of_columns_keep_the_first_that_fit(tmp_path, source):
    names = [f"measurement_column_with_a_long_descriptive_name_{i:03d}" for i in range(300)]
    with source.connect("base", "assets") as conn:
        cur = conn.cursor()
        cols = ", ".join(f"{n} NUMBER(12,4)" for n in names)
        cur.execute(f"CREATE OR REPLACE TABLE base.assets.wide_table (block_number BIGINT, {cols})")
        for i in range(3):
            cur.execute(f"INSERT INTO base.assets.wide_table VALUES ({i}, {', '.join(str(i * 1.5) for _ in names)})")
    spec = {"table": "base.assets.wide_table", "backfill_window": {"partition_key": "block", "start": 0, "end": 10}}
    got = ok(preview(tmp_path, source, spec))
    assert got["num_rows"] == 3 and got["bytes_per_row"] > 0
    assert got["columns_truncated"] is True and sample_of(got) == [] and got["sample_truncated"] is True
    want = [{"name": "block_number", "type": "NUMBER(38,0)"}] + [{"name": n, "type": "NUMBER(12,4)"} for n in names]
    n = len(got["columns"])
    assert 10 < n < len(want) and got["columns"] == want[:n]
    # As many as fit: one more would not have.
    bigger = {**got, "columns": want[: n + 1]}
    assert len(json.dumps(bigger, separators=(",", ":")).encode()) > RESULT_MAX_BYTES


def test_an_empty_window_has_columns_and_no_rows(tmp_path, source):
    window = {"partition_key": "block_timestamp", "start": "2030-01-01T00:00:00", "end": "2030-01-02T00:00:00"}
    got = ok(preview(tmp_path, source, source_spec(window)))
    assert got == {
        "num_rows": 0,
        "bytes_per_row": 0.0,
        "columns": TABLE_COLUMNS,
        "sample_z": "",
        "sample_truncated": False,
        "columns_truncated": False,
    }


def test_the_projection_is_measured_too(tmp_path, source):
    window = {"partition_key": "block", "start": 1000, "end": 3000}
    full = ok(preview(tmp_path, source, source_spec(window, sample_rows=0)))
    narrow = ok(preview(tmp_path, source, source_spec(window, columns=["block_number", "unique_id"], sample_rows=2)))
    assert full["num_rows"] == narrow["num_rows"] == 2000
    assert narrow["columns"] == [
        {"name": "block_number", "type": "NUMBER(38,0)"},
        {"name": "unique_id", "type": "TEXT"},
    ]
    assert sample_of(narrow) == [
        '{"block_number":1000,"unique_id":"0x0000000000000000000000000000000000000000000000000000000000000000-0"}',
        '{"block_number":1001,"unique_id":"0x0000000000000000000000000000000000000000000000000000000000000001-1"}',
    ]
    assert sample_of(full) == [] and not full["sample_truncated"]
    assert 0 < narrow["bytes_per_row"] < full["bytes_per_row"] / 2


def test_failures_are_stagings(tmp_path, source, bucket, gcs):
    window = {"partition_key": "block", "start": 1, "end": 2}
    r = preview(tmp_path, source, {"table": "base.assets.nope", "backfill_window": window})
    assert r.code == 2, r.stderr[-2000:]
    assert r.message == "staging: table base.assets.nope does not exist or is not authorized"
    staged = Job(
        tmp_path, backfill({"table": "base.assets.nope", "backfill_window": window}), snowflake=source, gcs=gcs
    )
    assert staged.run("stage").message == r.message, "the same words as staging's"

    r = preview(tmp_path, source, source_spec(window, columns=["no_such_column"]))
    assert r.code == 2 and r.message.startswith(f"staging: query on {TABLE} failed"), r.message

    r = preview(tmp_path, source, source_spec(window, destinations=[]))  # a backfill's field: not a preview's
    assert r.code == 2 and r.message.startswith("configuration: BEAM_SPEC is not a valid BeamPreview spec"), r.message


def test_an_unreachable_snowflake_is_transient(tmp_path, source):
    from beam_devstack.substrate.proc import free_port

    window = {"partition_key": "block", "start": 1, "end": 2}
    r = preview(tmp_path, source, source_spec(window), BEAM_SNOWFLAKE_PORT=free_port(), BEAM_CONNECT_TIMEOUT_S=2)
    assert r.code == 3, r.stderr[-2000:]
    assert r.message.startswith("staging: cannot connect to Snowflake at 127.0.0.1 within 2s"), r.message


def test_a_preview_queries_with_stagings_where_and_projection():
    """sql.select_query takes a PreviewSpec as it takes the BackfillSpec it comes from: the same
    statement and bound values; the count and the first rows are built around it."""
    from beam_contract.model import BackfillSpec
    from beam_contract.preview import PreviewSpec
    from beam_jobrunner import sql

    for window in (BLOCKS, HOURS):
        spec = BackfillSpec.model_validate(
            backfill(source_spec(window, columns=["unique_id"], filter={"column": "token_symbol", "values": ["a'", 7]}))
        )
        pv = PreviewSpec.of(spec)
        staged, q = sql.select_query(spec), sql.select_query(pv)
        assert (q.sql, q.params) == (staged.sql, staged.params)
        assert "?" in q.sql and "a'" not in q.sql and q.params[-2:] == ["a'", 7], "filter values stay bound"
        where = staged.sql.split(" WHERE ", 1)[1]
        count = sql.count_query(pv)
        assert (count.sql, count.params) == (f"SELECT COUNT(*) FROM {TABLE} WHERE {where}", staged.params)
        part = sql.PARTITION_COLUMNS[window["partition_key"]]
        first = sql.first_rows_query(pv, 1000)
        assert (first.sql, first.params) == (f"{staged.sql} ORDER BY {part} LIMIT 1000", staged.params)
