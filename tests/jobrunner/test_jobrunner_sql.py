"""The export SQL: golden unload statements parsed by sqlglot, hostile names refused, hostile values inert."""

from __future__ import annotations

import uuid

import pytest
import sqlglot
from jr_helpers import Job, managed
from sqlglot import exp

from beam_contract.model import BackfillSpec
from beam_devstack.substrate.kafka import consume_all
from beam_jobrunner import sql
from beam_jobrunner.errors import PermanentError

HOSTILE_VALUES = [
    "x'; DROP TABLE base.assets.erc20_token_transfers; --",
    "a\\' OR 1=1 --",
    "\\",
    "'",
    "''",
    "-- comment",
    "ünï©ødé ✓",
    "line\nbreak",
    "$$dollar$$",
    "%s ? :1",
]


def make_spec(**kw) -> BackfillSpec:
    base = {
        "job_name": "t",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {
            "partition_key": "block_timestamp",
            "start": "2024-01-01T00:00:00",
            "end": "2024-01-02T00:00:00Z",
        },
        "destinations": [{"type": "kafka", "name": "t"}],
    }
    base.update(kw)
    return BackfillSpec.model_validate(base)


def test_golden_unload_sql():
    spec = make_spec(columns=["unique_id", "amount"], filter={"column": "token_address", "values": ["0xabc", 7]})
    got = sql.unload_sql(spec, "beam.staging.gcs_stage", "ns-1/1234-abcd/chunks", 134217728)
    assert got == (
        "COPY INTO @beam.staging.gcs_stage/ns-1/1234-abcd/chunks/ FROM (SELECT unique_id, amount "
        "FROM base.assets.erc20_token_transfers WHERE block_timestamp >= CAST('2024-01-01 00:00:00.000000' AS TIMESTAMP_NTZ) "
        "AND block_timestamp < CAST('2024-01-02 00:00:00.000000' AS TIMESTAMP_NTZ) AND token_address IN ('0xabc', 7)) "
        "FILE_FORMAT = (TYPE = PARQUET) HEADER = TRUE MAX_FILE_SIZE = 134217728"
    )
    tree = sqlglot.parse_one(got, dialect="snowflake")
    assert isinstance(tree, exp.Copy)
    select = tree.find(exp.Select)
    assert [c.sql() for c in select.expressions] == ["unique_id", "amount"]
    assert select.find(exp.Table).sql(dialect="snowflake") == "base.assets.erc20_token_transfers"

    block = sql.unload_sql(
        make_spec(backfill_window={"partition_key": "block", "start": 10, "end": 20}), "s", "a/b", 1000
    )
    assert "WHERE block_number >= 10 AND block_number < 20)" in block
    sqlglot.parse_one(block, dialect="snowflake")


def test_timestamps_are_converted_to_utc():
    q = sql.select_query(
        make_spec(
            backfill_window={
                "partition_key": "block_timestamp",
                "start": "2024-01-01T02:00:00+02:00",
                "end": "2024-01-01T01:00:00.5Z",
            }
        )
    )
    assert q.params == ["2024-01-01 00:00:00.000000", "2024-01-01 01:00:00.500000"]


@pytest.mark.parametrize("value", HOSTILE_VALUES)
def test_hostile_filter_values_stay_literals_in_unload(value):
    spec = make_spec(filter={"column": "token_address", "values": [value, "0xabc"]})
    stmt = sql.unload_sql(spec, "st", "p/q", 1000)
    tree = sqlglot.parse_one(stmt, dialect="snowflake")  # one statement, nothing appended
    in_ = tree.find(exp.In)
    assert [lit.this for lit in in_.expressions] == [value, "0xabc"]
    assert len(sqlglot.parse(stmt, dialect="snowflake")) == 1


@pytest.mark.parametrize("bad", ["x; DROP TABLE y", 'a"b', "tok'en", "naïve", "a--b", "a b", "1abc", "a.b", "x\n"])
def test_hostile_identifiers_refused_by_model_and_by_sql(bad):
    with pytest.raises(ValueError):
        make_spec(columns=[bad])
    with pytest.raises(ValueError):
        make_spec(filter={"column": bad, "values": ["v"]})
    with pytest.raises(ValueError):
        make_spec(table=bad + ".t" if "." not in bad else bad + ";")
    # Even a spec that skipped validation cannot get the name into SQL.
    forged = make_spec().model_copy(update={"columns": [bad]})
    with pytest.raises(PermanentError):
        sql.select_query(forged)
    forged = make_spec().model_copy(update={"table": f"base.assets.{bad}"})
    with pytest.raises(PermanentError):
        sql.select_query(forged)
    if bad not in ("1abc", "a.b"):  # both are fine as a stage path segment (a namespace, a uuid)
        with pytest.raises(PermanentError):
            sql.unload_sql(make_spec(), "stage", f"ns/{bad}", 10)


def test_hostile_filter_values_end_to_end(tmp_path, source, bucket, gcs, kafka, rows):
    """Bound parameters: hostile values match nothing and the table survives."""
    topic = f"hostile-{uuid.uuid4().hex[:8]}"
    job = Job(
        tmp_path,
        {
            "job_name": "t",
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {"partition_key": "block", "start": 1000, "end": 1100},
            "filter": {"column": "token_symbol", "values": HOSTILE_VALUES + ["UNI'"]},
            "destinations": [{"type": "kafka", "name": topic}],
        },
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    staged = job.stage().json
    # Only the genuine value (which itself has a quote) matches: every 4th row.
    assert staged["num_rows"] == 25
    job.transport_all(staged["num_chunks"])
    assert len(consume_all(kafka.bootstrap, managed(topic))) == 25
    with source.connect("base", "assets") as conn:
        assert conn.cursor().execute("SELECT COUNT(*) FROM base.assets.erc20_token_transfers").fetchone()[0] == len(
            rows
        )


def test_missing_table_and_column(tmp_path, source, bucket, gcs):
    spec = {
        "job_name": "t",
        "table": "base.assets.nope",
        "backfill_window": {"partition_key": "block", "start": 1, "end": 2},
        "destinations": [{"type": "kafka", "name": "t"}],
    }
    r = Job(tmp_path, spec, snowflake=source, gcs=gcs).run("stage")
    assert r.code == 2
    assert r.message == "staging: table base.assets.nope does not exist or is not authorized"

    spec.update(table="base.assets.erc20_token_transfers", columns=["no_such_column"])
    r = Job(tmp_path, spec, snowflake=source, gcs=gcs).run("stage")
    assert r.code == 2 and r.message.startswith("staging: query on base.assets.erc20_token_transfers failed")


def test_empty_window_and_operator_deletes_staged_files(tmp_path, source, bucket, gcs, monkeypatch):
    """The operator's deletion (finalizer, retention) of what the jobrunner staged, on fake-gcs-server."""
    from beam_contract.staging import StagingLayoutError
    from beam_jobrunner import storage
    from beam_operator import staged_files

    spec = {
        "job_name": "t",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {
            "partition_key": "block_timestamp",
            "start": "2030-01-01T00:00:00",
            "end": "2030-01-02T00:00:00",
        },
        "destinations": [{"type": "kafka", "name": "t"}],
    }
    job = Job(tmp_path, spec, snowflake=source, gcs=gcs)
    staged = job.stage().json
    assert staged == {"num_chunks": 0, "num_rows": 0, "manifest": job.staging + "manifest.json"}

    other = Job(
        tmp_path,
        {**spec, "backfill_window": {"partition_key": "block", "start": 1000, "end": 1900}},
        snowflake=source,
        gcs=gcs,
    )
    assert other.stage().json["num_chunks"] >= 2
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoints()["url"])
    storage.filesystem.cache_clear()
    staged_files._client.cache_clear()
    try:
        n = len(storage.list_files(other.staging))
        assert n >= 3  # chunks + manifest
        # Deleting one job's prefix (here: the empty window's manifest) leaves the other's alone.
        assert staged_files.delete_staged(job.staging) == 1
        assert len(storage.list_files(other.staging)) == n
        assert staged_files.delete_staged(other.staging) == n
        assert storage.list_files(other.staging) == []
        with pytest.raises(StagingLayoutError, match="refusing to delete"):
            staged_files.delete_staged(f"gs://{bucket}/backfills/")
        with pytest.raises(StagingLayoutError, match="not a gs:// URI"):
            staged_files.delete_staged(f"/{bucket}/backfills/ns/uid/")
        # A second deletion of the same prefix finds nothing and succeeds (a retried finalizer).
        assert staged_files.delete_staged(other.staging) == 0
    finally:
        storage.filesystem.cache_clear()
        staged_files._client.cache_clear()


def test_golden_cancel_sql_and_only_query_ids_in_it():
    qid = "01b2c3d4-0000-4e21-0000-00000000000a"
    assert sql.cancel_sql(qid) == f"SELECT SYSTEM$CANCEL_QUERY('{qid}')"
    sqlglot.parse_one(sql.cancel_sql(qid), read="snowflake")
    for bad in ("", "x'); DROP TABLE t; --", "01b2c3d4 0000"):
        with pytest.raises(PermanentError, match="is not a Snowflake query id"):
            sql.cancel_sql(bad)


UNLOAD_UNDER_SIGTERM = """
import json, sys
from beam_contract.model import BackfillSpec
from beam_jobrunner import stage, termination
from beam_jobrunner.config import Common

out = sys.argv[1]

def record(what):
    with open(out, "a") as f:
        f.write(json.dumps(what) + "\\n")

class Cursor:
    sfqid = None
    def execute_async(self, statement):
        record(statement)
        self.sfqid = "01b2c3d4-0000-4e21-0000-00000000000a"
    def execute(self, statement, timeout=None):
        record(statement)
    def close(self):
        pass

class Connection:  # Snowflake answering that the COPY runs, until the Pod is deleted
    polled = False
    def cursor(self):
        return Cursor()
    def get_query_status_throw_if_error(self, query_id):
        return "RUNNING"
    def is_still_running(self, status):
        if not self.polled:
            self.polled = True
            record("running")
        return True

termination.install(lambda message: record(message))
spec = BackfillSpec.model_validate(json.loads(sys.argv[2]))
common = Common(spec=spec, job_id="1234-abcd", namespace="org-a", staging_uri="gs://b/backfills/org-a/1234-abcd/",
                connect_timeout=5)
stage.stage_unload(common, Connection(), 1000)
"""


def test_sigterm_during_an_unload_cancels_its_query_in_snowflake(tmp_path):
    """The real signal from outside: the worker runs the COPY asynchronously, under its own
    attempt's folder, and on SIGTERM cancels it by query id before it exits 143."""
    import json
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "statements.jsonl"
    script = tmp_path / "unload.py"
    script.write_text(UNLOAD_UNDER_SIGTERM)
    spec = make_spec().model_dump(mode="json", exclude_none=True)
    env = {"PATH": "/usr/bin:/bin", "BEAM_UNLOAD_STAGE": "beam.staging.gcs_stage"}
    proc = subprocess.Popen([sys.executable, str(script), str(out), json.dumps(spec)], env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not (out.exists() and '"running"' in out.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        proc.kill()
    unload, running, cancel, exited = [json.loads(line) for line in out.read_text().splitlines()]
    assert unload.startswith("COPY INTO @beam.staging.gcs_stage/org-a/1234-abcd/chunks/"), unload
    attempt = unload.split("/chunks/", 1)[1].split("/", 1)[0]
    assert len(attempt) == 12 and int(attempt, 16) >= 0, attempt  # a folder of this attempt's own
    assert running == "running"
    assert cancel == "SELECT SYSTEM$CANCEL_QUERY('01b2c3d4-0000-4e21-0000-00000000000a')"
    assert exited.startswith("terminated by SIGTERM"), exited
