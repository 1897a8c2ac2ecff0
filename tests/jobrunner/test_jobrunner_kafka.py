"""Stage from fakesnow through the real CLI into fake-gcs-server, transport into Apache Kafka."""

from __future__ import annotations

import json
import signal
import uuid
from datetime import datetime

import pyarrow.fs as pafs
from confluent_kafka import Producer
from jr_helpers import TOKENS, Job, expected_ids, managed

from beam_contract import staging
from beam_devstack.substrate.kafka import consume_all
from beam_devstack.substrate.kafka_proxy import END_TXN


def spec(topic: str, window: dict, **extra) -> dict:
    return {
        "job_name": "test",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": window,
        "destinations": [{"type": "kafka", "name": topic}],
        **extra,
    }


def test_timestamp_window_with_filter_exactly_once(tmp_path, source, bucket, gcs, kafka, rows):
    topic = f"ts-{uuid.uuid4().hex[:8]}"
    start, end = datetime(2024, 1, 1, 1, 0, 0), datetime(2024, 1, 1, 6, 0, 0)
    tokens = TOKENS[:2]
    job = Job(
        tmp_path,
        spec(
            topic,
            {"partition_key": "block_timestamp", "start": "2024-01-01T01:00:00", "end": "2024-01-01T06:00:00Z"},
            filter={"column": "token_address", "values": tokens},
        ),
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    staged = job.stage().json
    want = expected_ids(rows, start, end, tokens=tokens)
    assert staged["num_rows"] == len(want)
    assert staged["num_chunks"] >= 2, "the small target size must split the window"
    assert staged["manifest"] == job.staging + "manifest.json"

    job.transport_all(staged["num_chunks"])
    msgs = consume_all(kafka.bootstrap, managed(topic))
    got = [m.key().decode() for m in msgs]
    assert len(got) == len(set(got)), "duplicates"
    assert set(got) == set(want)

    by_id = {r["unique_id"]: r for r in rows}
    first = min(want, key=lambda u: by_id[u]["block_timestamp"])
    assert by_id[first]["block_timestamp"] == start, "the row exactly at start is included"
    at_end = [r for r in rows if r["block_timestamp"] == end]
    assert at_end and at_end[0]["unique_id"] not in set(got), "the row exactly at end is excluded"

    # The message format (docs/message-format.md), checked on the row at the window's start.
    m = next(m for m in msgs if m.key().decode() == first)
    body = json.loads(m.value())
    src = by_id[first]
    assert body["unique_id"] == first and body["block_timestamp"] == "2024-01-01T01:00:00Z"
    assert body["block_number"] == src["block_number"] and body["amount"] == src["amount"]
    assert body["raw_amount"] == src["raw_amount"] and body["token_name"] == src["token_name"]
    assert list(body) == [c for c in body], "columns keep the table's order"
    assert dict(m.headers()) == {"beam_job_id": job.job_id.encode(), "beam_chunk": b"0"}


def test_block_window_with_projection(tmp_path, source, bucket, gcs, kafka, rows):
    topic = f"blk-{uuid.uuid4().hex[:8]}"
    job = Job(
        tmp_path,
        spec(
            topic,
            {"partition_key": "block", "start": 1500, "end": 2100},
            columns=["unique_id", "block_number", "amount", "block_timestamp"],
        ),
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    staged = job.stage().json
    job.transport_all(staged["num_chunks"])
    msgs = consume_all(kafka.bootstrap, managed(topic))
    got = [m.key().decode() for m in msgs]
    want = expected_ids(rows, blocks=(1500, 2100))
    assert len(got) == len(set(got)) == len(want) == 600
    assert set(got) == set(want)
    blocks = sorted(json.loads(m.value())["block_number"] for m in msgs)
    assert blocks[0] == 1500 and blocks[-1] == 2099
    assert set(json.loads(msgs[0].value())) == {"unique_id", "block_number", "amount", "block_timestamp"}


def test_killed_inside_its_transaction_then_rerun_delivers_exactly_once(tmp_path, source, bucket, gcs, kafka, rows):
    """SIGKILL from outside while the chunk's rows sit in an open transaction, as a deleted Pod dies."""
    topic = f"crash-{uuid.uuid4().hex[:8]}"
    job = Job(
        tmp_path,
        spec(topic, {"partition_key": "block", "start": 1000, "end": 2000}),
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    staged = job.stage().json
    n = staged["num_chunks"]
    assert n >= 2

    # The worker talks to the broker through the stack's proxy, which holds back its commit
    # (EndTxn): when the proxy has it, every row of the chunk is in the broker's log inside an
    # open transaction. That is the observable point of the kill; nothing is timed.
    with kafka.proxy.holding(END_TXN):
        worker = job.start("transport", JOB_COMPLETION_INDEX=0, BEAM_KAFKA_BOOTSTRAP=kafka.proxy.bootstrap)
        if not kafka.proxy.wait_held(1, timeout=60):
            worker.kill()
            raise AssertionError(f"the worker never tried to commit: {worker.communicate()[1][-2000:]}")
        assert len(consume_all(kafka.bootstrap, managed(topic), "read_uncommitted")) > 0, "the rows are in the log"
        assert consume_all(kafka.bootstrap, managed(topic)) == [], "read_committed must not see an open transaction"
        worker.send_signal(signal.SIGKILL)
        assert worker.wait(30) == -signal.SIGKILL
    assert consume_all(kafka.bootstrap, managed(topic)) == [], (
        "the killed attempt's rows stay invisible to read_committed"
    )

    # The rerun fences the killed attempt (same transactional id), which aborts its transaction.
    rerun = job.transport(0)
    assert rerun.code == 0, rerun.stderr[-2000:]
    # A chunk already committed is found by its marker and skipped, as after a kill right after
    # the commit, before the worker wrote the chunk's progress object: its rows are not sent twice.
    for i in range(1, n):
        assert job.transport(i).code == 0
    fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")
    fs.delete_file(staging.progress_uri(job.staging, 1).removeprefix("gs://"))
    again = job.transport(1)
    assert again.code == 0, again.stderr[-2000:]
    assert (again.json["destinations"][0]["skipped"], again.json["destinations"][0]["chunks"]) == (1, 0)

    got = [m.key().decode() for m in consume_all(kafka.bootstrap, managed(topic))]
    want = expected_ids(rows, blocks=(1000, 2000))
    assert len(got) == len(set(got)), "duplicates after the kill and the reruns"
    assert set(got) == set(want)
    assert len(consume_all(kafka.bootstrap, managed(topic), "read_uncommitted")) > len(want), (
        "the killed attempt really produced"
    )


def test_sigterm_inside_a_transaction_aborts_it_so_consumers_of_the_topic_go_on(
    tmp_path, source, bucket, gcs, kafka, rows
):
    """SIGTERM, as the kubelet sends when a Pod is deleted (cancel, eviction), while the chunk's
    rows sit in an open transaction: the worker aborts it and exits 143, so a message another
    producer writes afterwards is visible to read_committed at once, not after the broker's
    transaction timeout (15 minutes)."""
    topic = f"sigterm-{uuid.uuid4().hex[:8]}"
    job = Job(
        tmp_path,
        spec(topic, {"partition_key": "block", "start": 1000, "end": 2000}),
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
    )
    job.stage()
    with kafka.proxy.holding(END_TXN):
        worker = job.start("transport", JOB_COMPLETION_INDEX=0, BEAM_KAFKA_BOOTSTRAP=kafka.proxy.bootstrap)
        if not kafka.proxy.wait_held(1, timeout=60):
            worker.kill()
            raise AssertionError(f"the worker never tried to commit: {worker.communicate()[1][-2000:]}")
        assert len(consume_all(kafka.bootstrap, managed(topic), "read_uncommitted")) > 0, "the rows are in the log"
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(20) == 143, worker.communicate()[1][-2000:]
        stderr = worker.communicate()[1]
        assert "aborted the open transaction of chunk 0" in stderr, stderr[-2000:]
        # Still inside the hold: the commit can never have gone through.
        other = Producer({"bootstrap.servers": kafka.bootstrap})
        other.produce(managed(topic), key=b"after", value=b"produced after the SIGTERM")
        assert other.flush(10) == 0
        seen = consume_all(kafka.bootstrap, managed(topic))  # read_committed, up to the last stable offset
        assert [m.key() for m in seen] == [b"after"], "the aborted rows are hidden, the new message is not"


def test_unreachable_broker_and_missing_secret(tmp_path, source, bucket, gcs, kafka):
    from beam_devstack.substrate.proc import free_port

    dead = f"127.0.0.1:{free_port()}"
    job = Job(
        tmp_path,
        {
            **spec("x", {"partition_key": "block", "start": 1000, "end": 1100}),
            "destinations": [{"type": "kafka", "name": "dead", "bootstrap_servers": dead}],
        },
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
        extra={"BEAM_CONNECT_TIMEOUT_S": "3"},
    )
    job.stage()
    r = job.transport(0)
    assert r.code == 3, r.stderr[-2000:]
    assert r.message.startswith("kafka destination 'dead' chunk 0:") and dead in r.message

    job = Job(
        tmp_path,
        {
            **spec("x", {"partition_key": "block", "start": 1000, "end": 1100}),
            "destinations": [
                {"type": "kafka", "name": "ext", "bootstrap_servers": kafka.bootstrap, "secret": "ext-kafka"}
            ],
        },
        snowflake=source,
        gcs=gcs,
        kafka=kafka,
        extra={"BEAM_DEST_0_SASL_USERNAME": "alice"},
    )
    job.stage()
    r = job.transport(0)
    assert r.code == 2
    assert "sasl_password missing" in r.message and "BEAM_DEST_0_SASL_PASSWORD" in r.message
