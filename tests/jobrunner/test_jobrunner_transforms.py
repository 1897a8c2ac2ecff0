"""spec.transforms through the real CLI: staged from fakesnow, transformed in the workers'
sandbox, delivered to Kafka exactly once and to a webhook with stable idempotency keys; a
script that cannot run refused before any row is staged, or failing its chunk for good with an
error a user can act on."""

from __future__ import annotations

import json
import signal
import uuid

import pyarrow.fs as pafs
from jr_helpers import TOKENS, Job, drain_queue, expected_ids, managed, nats_stream, read_nats, sns_topic_to_queue
from test_jobrunner_sinks import KEY, Receiver

from beam_contract import staging
from beam_contract.worker import LOG_TAIL_MARK
from beam_devstack.substrate.kafka import consume_all
from beam_devstack.substrate.kafka_proxy import END_TXN

WINDOW = {"partition_key": "block", "start": 1000, "end": 1600}
# Adds a field and drops the rows of one token (TOKENS[1]); what the e2e test does on the node.
ADD_AND_DROP = f"""function transform(row) {{
  if (row.token_address === "{TOKENS[1]}") return null;
  row.label = row.token_symbol + "#" + row.block_number;
  return row;
}}"""


def spec(dest: dict, *scripts: str, window=WINDOW) -> dict:
    return {
        "job_name": "t",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": window,
        "destinations": [dest],
        "transforms": [{"type": "v8", "script": s} for s in scripts],
    }


def expected(rows) -> dict[str, str]:
    """unique_id -> label of the rows ADD_AND_DROP delivers."""
    want = set(expected_ids(rows, blocks=(1000, 1600)))
    return {
        r["unique_id"]: f"{r['token_symbol']}#{r['block_number']}"
        for r in rows
        if r["unique_id"] in want and r["token_address"] != TOKENS[1]
    }


def gcs_fs(gcs):
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")


def test_kafka_gets_the_transformed_rows_exactly_once_through_a_kill_and_reruns(
    tmp_path, source, bucket, gcs, kafka, rows
):
    topic = f"tf-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec({"type": "kafka", "name": topic}, ADD_AND_DROP), snowflake=source, gcs=gcs, kafka=kafka)
    staged = job.stage().json
    n = staged["num_chunks"]
    assert n >= 2 and staged["num_rows"] == 600, "staging stages every row: transforms run in transport"

    # Killed while its transformed rows sit in an open transaction, then rerun.
    with kafka.proxy.holding(END_TXN):
        worker = job.start("transport", JOB_COMPLETION_INDEX=0, BEAM_KAFKA_BOOTSTRAP=kafka.proxy.bootstrap)
        if not kafka.proxy.wait_held(1, timeout=60):
            worker.kill()
            raise AssertionError(f"the worker never tried to commit: {worker.communicate()[1][-2000:]}")
        assert consume_all(kafka.bootstrap, managed(topic)) == []
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    results = [job.transport(i) for i in range(n)]
    assert all(r.code == 0 for r in results), [r.stderr[-2000:] for r in results]
    delivered = results[0].json["destinations"][0]
    assert delivered["rows"] > delivered["messages"] > 0, delivered
    # A chunk committed but not recorded as progress is found by its Kafka marker: nothing twice.
    gcs_fs(gcs).delete_file(staging.progress_uri(job.staging, 1).removeprefix("gs://"))
    again = job.transport(1)
    assert again.code == 0 and again.json["destinations"][0]["skipped"] == 1, again.stderr[-2000:]

    msgs = consume_all(kafka.bootstrap, managed(topic))  # read_committed
    want = expected(rows)
    got = {m.key().decode(): json.loads(m.value()) for m in msgs}
    assert len(msgs) == len(got) == len(want), "each transformed row exactly once"
    assert {k: v["label"] for k, v in got.items()} == want
    assert all(v["unique_id"] == k and v["token_address"] != TOKENS[1] for k, v in got.items())
    assert list(next(iter(got.values())))[-1] == "label", "the added field comes last, the columns keep their order"
    assert len(consume_all(kafka.bootstrap, managed(topic), "read_uncommitted")) > len(want), "the kill really produced"


def test_webhook_batches_keep_their_idempotency_keys_and_rows_across_a_rerun(tmp_path, source, bucket, gcs, rows):
    """Rows dropped and multiplied: the batches are cut from the transformed rows, so a rerun
    (with other engine batches) sends the same rows under the same keys."""
    twice = "function transform(row) { return row.log_index === 0 ? [row, {...row, copy: true}] : row; }"
    recv = Receiver(KEY)
    try:
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hook", "url": recv.url, "hash_key": "hook-secret"}, ADD_AND_DROP, twice),
            snowflake=source,
            gcs=gcs,
            extra={"BEAM_DEST_0_HASH_KEY": KEY, "BEAM_WEBHOOK_BATCH_ROWS": "37"},
        )
        staged = job.stage().json
        n = staged["num_chunks"]
        job.transport_all(n)
        first = recv.rows[:]
        batches = list(recv.keys)
        # Forget that anything was delivered (progress and the destination's marker): the
        # rerun sends every chunk again, with engine batches of 13 rows instead of 4,096.
        fs = gcs_fs(gcs)
        for i in range(n):
            fs.delete_file(staging.progress_uri(job.staging, i).removeprefix("gs://"))
            fs.delete_file(staging.delivered_marker_uri(job.staging, 0, i).removeprefix("gs://"))
        seen_before = recv.requests
        recv.keys.clear()
        recv.rows.clear()
        for i in range(n):
            r = job.transport(i, BEAM_TRANSFORM_BATCH_ROWS=13)
            assert r.code == 0, r.stderr[-2000:]
        assert recv.requests > seen_before
        assert recv.keys == batches, "the same idempotency keys, in the same order"
        assert recv.rows == first, "under each key, the same rows"
    finally:
        recv.close()
    want = expected(rows)
    doubled = {u for u in want if next(r for r in rows if r["unique_id"] == u)["log_index"] == 0}
    assert len(first) == len(want) + len(doubled)
    assert sorted(r["unique_id"] for r in first if not r.get("copy")) == sorted(want)
    assert sorted(r["unique_id"] for r in first if r.get("copy")) == sorted(doubled)
    assert all(r["label"] == want[r["unique_id"]] for r in first)


def test_nats_message_ids_of_multiplied_rows_are_distinct(tmp_path, source, bucket, gcs, nats, rows):
    subject = nats_stream(nats)
    window = {"partition_key": "block", "start": 2000, "end": 2100}
    job = Job(
        tmp_path,
        spec(
            {"type": "nats", "name": subject, "url": nats.endpoints()["url"]},
            "function transform(r) { return [r, r]; }",
            window=window,
        ),
        snowflake=source,
        gcs=gcs,
    )
    job.transport_all(job.stage().json["num_chunks"])
    got = [mid for mid, _ in read_nats(nats, subject)]
    want = expected_ids(rows, blocks=(2000, 2100))
    assert sorted(got) == sorted(f"{u}#{n}" for u in want for n in (0, 1)), "both copies, neither deduplicated away"


def test_sns_fifo_keeps_both_rows_a_transform_made_of_one(tmp_path, source, bucket, gcs, sns, rows):
    # FIFO deduplicates by MessageDeduplicationId (the key's SHA-256): `<unique_id>#0` and `#1`
    # must differ, or the topic would drop the second copy.
    arn, q = sns_topic_to_queue(sns, fifo=True)
    job = Job(
        tmp_path,
        spec(
            {"type": "sns", "name": "sns", "topic_arn": arn, "endpoint_url": sns.endpoints()["url"], "secret": "aws"},
            'function transform(r) { return [{...r, side: "from"}, {...r, side: "to"}]; }',
            window={"partition_key": "block", "start": 2000, "end": 2100},
        ),
        snowflake=source,
        gcs=gcs,
        extra={"BEAM_DEST_0_AWS_ACCESS_KEY_ID": "testing", "BEAM_DEST_0_AWS_SECRET_ACCESS_KEY": "testing"},
    )
    job.transport_all(job.stage().json["num_chunks"])
    got = [(doc["unique_id"], doc["side"]) for doc in drain_queue(sns, q)]
    want = expected_ids(rows, blocks=(2000, 2100))
    assert sorted(got) == sorted((u, side) for u in want for side in ("from", "to"))


def test_staging_refuses_a_script_that_does_not_compile_before_staging_any_row(tmp_path, source, bucket, gcs):
    bad = "function transform(row) {\n  row.x = ;\n  return row;\n}"
    job = Job(tmp_path, spec({"type": "kafka", "name": "never"}, ADD_AND_DROP, bad), snowflake=source, gcs=gcs)
    r = job.run("stage")
    assert r.code == 2, r.stderr[-2000:]
    assert (
        r.message
        == "transforms: transform 2 of 2 does not compile: SyntaxError: Unexpected token ';' at line 2, column 11"
    )
    assert gcs_fs(gcs).get_file_info(pafs.FileSelector(job.staging.removeprefix("gs://"), allow_not_found=True)) == []
    assert "connected to Snowflake" not in r.stderr, "refused before connecting"


def test_a_transport_worker_compiles_before_it_delivers(tmp_path, source, bucket, gcs, kafka):
    """Staging checked the scripts; a worker checks them again before it opens a destination."""
    topic = f"tf-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec({"type": "kafka", "name": topic}, ADD_AND_DROP), snowflake=source, gcs=gcs, kafka=kafka)
    job.stage()
    job.env["BEAM_SPEC"] = json.dumps(spec({"type": "kafka", "name": topic}, "function transform(r) { return r +; }"))
    r = job.transport(0)
    assert r.code == 2 and "transform 1 of 1 does not compile" in r.message, r.stderr[-2000:]
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": kafka.bootstrap}).list_topics(timeout=10).topics
    assert managed(topic) not in topics, "no destination was opened"


def hostile(tmp_path, source, gcs, kafka, script: str, **env):
    topic = f"tf-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec({"type": "kafka", "name": topic}, script), snowflake=source, gcs=gcs, kafka=kafka)
    job.stage()
    r = job.transport(0, **env)
    assert r.code == 2, (r.code, r.stderr[-3000:])
    assert r.termination.startswith(r.message + "\nfailed chunk: 0\n" + LOG_TAIL_MARK), r.termination
    assert consume_all(kafka.bootstrap, managed(topic)) == [], "nothing of the failed chunk is visible"
    return r


def test_a_throwing_script_fails_its_chunk_naming_the_row_and_the_line_and_nothing_more(
    tmp_path, source, bucket, gcs, kafka, rows
):
    victim = next(r for r in rows if r["block_number"] == 1003)
    r = hostile(
        tmp_path,
        source,
        gcs,
        kafka,
        "function transform(row) {\n  if (row.block_number === 1003) {\n    throw new Error('bad block');\n  }\n  return row;\n}",
    )
    assert r.message == (
        f"transforms: transform 1 of 1 threw on chunk 0, row with unique_id {victim['unique_id']}: "
        "Error: bad block at line 3, column 11"
    )
    # No row's contents in the error or the log lines: only its unique_id.
    for value in (victim["block_hash"], victim["from_address"], victim["raw_amount_str"]):
        assert value not in r.termination and value not in r.stderr


def test_an_infinite_loop_fails_its_chunk_at_the_time_limit(tmp_path, source, bucket, gcs, kafka):
    r = hostile(tmp_path, source, gcs, kafka, "function transform(row) { for (;;) {} }", BEAM_TRANSFORM_TIMEOUT_S="1")
    assert "ran past the time limit of 1 s per batch" in r.message and "on chunk 0, at row with unique_id" in r.message


def test_a_2_gb_allocation_fails_its_chunk_and_the_worker_reports_it(tmp_path, source, bucket, gcs, kafka):
    r = hostile(
        tmp_path,
        source,
        gcs,
        kafka,
        "function transform(row) { row.big = new Array(2 ** 28).fill(0); return row; }",
        BEAM_TRANSFORM_MEMORY_MIB="64",
        # V8 takes 8-15 s of last-resort collections to give up on a loaded machine: the time
        # limit must not stop it first (that too would be a clear error, but another one)
        BEAM_TRANSFORM_TIMEOUT_S="60",
    )
    assert "ran past the memory limit of 64 MiB on chunk 0" in r.message, r.message


def test_a_script_returning_a_string_fails_its_chunk(tmp_path, source, bucket, gcs, kafka):
    r = hostile(tmp_path, source, gcs, kafka, "function transform(row) { return JSON.stringify(row); }")
    assert "transform 1 of 1 returned a string on chunk 0, row with unique_id" in r.message
