"""The data-plane stand-ins behave like the real services on what beam-backfill relies on.

Every test talks to a real server process started by the session fixtures, through the same
client libraries the job runner uses.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from collections import defaultdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def _unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def _create_topic(bootstrap: str, name: str, partitions: int) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)]).values():
        future.result(30)


def _drain(bootstrap: str, topic: str, partitions: int, isolation: str) -> list:
    """Read every partition from the start to its end (everything was produced beforehand)."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": _unique("drain"),
            "enable.auto.commit": False,
            "isolation.level": isolation,
            # End of partition is judged by the client against the high watermark or, under
            # read_committed, the last stable offset; control records (commit and abort markers)
            # take offsets but are never delivered, so counting messages could not tell the end.
            "enable.partition.eof": True,
        }
    )
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    seen, at_end = [], set()
    deadline = time.monotonic() + 60
    try:
        while len(at_end) < partitions:
            assert time.monotonic() < deadline, f"{topic}: only partitions {at_end} drained"
            for msg in consumer.consume(num_messages=10_000, timeout=0.5):
                if msg.error() is None:
                    seen.append(msg)
                elif msg.error().code() == KafkaError._PARTITION_EOF:
                    at_end.add(msg.partition())
                else:
                    raise KafkaException(msg.error())
    finally:
        consumer.close()
    return seen


def test_kafka_keyed_messages_all_come_back_in_their_partitions(kafka):
    topic, n, partitions = _unique("keyed"), 100_000, 4
    _create_topic(kafka.bootstrap, topic, partitions)

    delivered: dict[bytes, int] = {}
    errors = []

    def on_delivery(err, msg):
        if err is not None:
            errors.append(err)
        else:
            delivered[msg.key()] = msg.partition()

    producer = Producer(
        {
            "bootstrap.servers": kafka.bootstrap,
            "enable.idempotence": True,
            "compression.type": "lz4",
            "linger.ms": 20,
        }
    )
    for i in range(n):
        while True:
            try:
                producer.produce(
                    topic, key=f"key-{i}".encode(), value=f'{{"n": {i}}}'.encode(), on_delivery=on_delivery
                )
                break
            except BufferError:
                producer.poll(0.1)
        producer.poll(0)
    assert producer.flush(60) == 0
    assert errors == []
    assert len(delivered) == n

    messages = _drain(kafka.bootstrap, topic, partitions, "read_committed")
    assert len(messages) == n
    partitions_by_key: dict[bytes, set[int]] = defaultdict(set)
    for m in messages:
        partitions_by_key[m.key()].add(m.partition())
    assert len(partitions_by_key) == n
    # Each key lives in exactly one partition, the one the broker acknowledged to the producer.
    assert {k: p.pop() for k, p in partitions_by_key.items() if len(p) == 1} == delivered
    assert {m.partition() for m in messages} == set(range(partitions))
    # Key order inside each partition is the produce order (idempotent producer, one session).
    for p in range(partitions):
        numbers = [int(m.key().split(b"-")[1]) for m in messages if m.partition() == p]
        assert numbers == sorted(numbers)


def test_kafka_read_committed_hides_aborted_transactions(kafka):
    topic = _unique("txn")
    _create_topic(kafka.bootstrap, topic, 1)
    producer = Producer({"bootstrap.servers": kafka.bootstrap, "transactional.id": _unique("txn-test")})
    producer.init_transactions(30)

    producer.begin_transaction()
    for i in range(50):
        producer.produce(topic, key=b"aborted", value=str(i).encode())
    # Without the flush, abort would purge the messages still queued in the client and the
    # broker would never hold anything to hide.
    assert producer.flush(30) == 0
    producer.abort_transaction(30)

    producer.begin_transaction()
    for i in range(70):
        producer.produce(topic, key=b"committed", value=str(i).encode())
    producer.commit_transaction(30)

    committed = _drain(kafka.bootstrap, topic, 1, "read_committed")
    assert len(committed) == 70
    assert {m.key() for m in committed} == {b"committed"}
    assert [m.value() for m in committed] == [str(i).encode() for i in range(70)]

    everything = _drain(kafka.bootstrap, topic, 1, "read_uncommitted")
    assert len(everything) == 120
    assert sum(m.key() == b"aborted" for m in everything) == 50


def test_kafka_proxy_holds_the_commits_of_one_transactional_id_after_letting_some_through(kafka):
    """The fault tests' hold (beam_devstack.substrate.kafka_proxy): only commits whose
    transactional.id has the prefix are counted, and the first `after` of them go through."""
    import threading

    from beam_devstack.substrate.kafka_proxy import END_TXN

    topic = _unique("held")
    _create_topic(kafka.bootstrap, topic, 1)
    mine, other = _unique("beam-mine"), _unique("beam-other")

    def producer(txid: str) -> Producer:
        p = Producer({"bootstrap.servers": kafka.proxy.bootstrap, "transactional.id": txid})
        p.init_transactions(30)
        return p

    def commit(p: Producer, key: bytes, done: list) -> None:
        p.begin_transaction()
        p.produce(topic, key=key, value=b"x")
        p.commit_transaction(60)
        done.append(key)

    done: list[bytes] = []
    with kafka.proxy.holding(END_TXN, after=1, transactional_id=mine):
        a, b = producer(mine), producer(other)
        commit(b, b"other-1", done)  # not mine: passes, and is not the one let through
        commit(a, b"mine-1", done)  # mine, the first: let through
        held = threading.Thread(target=commit, args=(a, b"mine-2", done), daemon=True)
        held.start()
        assert kafka.proxy.wait_held(1, timeout=30)
        commit(b, b"other-2", done)
        assert done == [b"other-1", b"mine-1", b"other-2"]
    held.join(60)  # released: the cut connection is retried and the commit goes through
    assert done[-1] == b"mine-2"
    assert sorted(m.key() for m in _drain(kafka.bootstrap, topic, 1, "read_committed")) == sorted(done)


def test_kafka_sasl_ssl_listener_takes_its_user_and_its_ca_only(kafka, tmp_path):
    from confluent_kafka.admin import AdminClient

    from beam_devstack.substrate import pki

    topic = _unique("sasl")
    p = Producer(kafka.sasl_ssl_client_config())
    p.produce(topic, key=b"k", value=b"over SASL_SSL")
    assert p.flush(30) == 0
    assert [m.value() for m in _drain(kafka.bootstrap, topic, 1, "read_committed")] == [b"over SASL_SSL"]

    def refusal(**override) -> str:
        conf = {**kafka.sasl_ssl_client_config(), **override}
        errors = []
        admin = AdminClient({**conf, "error_cb": lambda e: errors.append(str(e))})
        with pytest.raises(KafkaException):
            admin.list_topics(timeout=5)
        admin.poll(1)  # serves error_cb
        return " ".join(errors)

    assert "Authentication failed" in refusal(**{"sasl.password": "wrong"})
    other_ca, _ = pki.make_ca(tmp_path / "other", "not-the-brokers-ca")
    assert "certificate verify failed" in refusal(**{"ssl.ca.pem": other_ca.read_text()})


def test_gcs_parquet_written_by_one_client_is_read_by_the_other(gcs, monkeypatch):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    from pyarrow import fs as pafs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoints()["url"])
    client = storage.Client(project="beam-test", credentials=AnonymousCredentials())
    bucket = client.create_bucket(_unique("staging"))
    gfs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")

    table = pa.table(
        {
            "block_number": pa.array(range(1000), pa.int64()),
            "tx_hash": [f"0x{i:064x}" for i in range(1000)],
            "amount": pa.array([i * 10**18 for i in range(1000)], pa.decimal128(38, 0)),
        }
    )

    # google-cloud-storage writes, pyarrow reads.
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    bucket.blob("a/part-0.parquet").upload_from_string(buf.getvalue(), content_type="application/octet-stream")
    assert pq.read_table(f"{bucket.name}/a/part-0.parquet", filesystem=gfs).equals(table)

    # pyarrow writes, google-cloud-storage reads.
    pq.write_table(table, f"{bucket.name}/b/part-0.parquet", filesystem=gfs)
    data = bucket.blob("b/part-0.parquet").download_as_bytes()
    assert pq.read_table(io.BytesIO(data)).equals(table)

    assert sorted(b.name for b in client.list_blobs(bucket.name)) == ["a/part-0.parquet", "b/part-0.parquet"]


WINDOW_SQL = """
SELECT block_number, block_timestamp, tx_hash
FROM base.assets.erc20_token_transfers
WHERE block_timestamp >= CAST(? AS TIMESTAMP_NTZ) AND block_timestamp < CAST(? AS TIMESTAMP_NTZ)
ORDER BY block_number
"""


def test_fakesnow_window_query_is_start_inclusive_end_exclusive(snowflake):
    seed = snowflake.connect()
    cur = seed.cursor()
    cur.execute("CREATE DATABASE IF NOT EXISTS base")
    cur.execute("CREATE SCHEMA IF NOT EXISTS base.assets")
    cur.execute(
        "CREATE OR REPLACE TABLE base.assets.erc20_token_transfers "
        "(block_number INTEGER, block_timestamp TIMESTAMP_NTZ, tx_hash VARCHAR)"
    )
    rows = [
        (1, "2024-01-01 23:59:59.999999"),  # just before the window
        (2, "2024-01-02 00:00:00"),  # the start: included
        (3, "2024-01-02 12:00:00"),
        (4, "2024-01-02 23:59:59.999999"),  # last instant inside
        (5, "2024-01-03 00:00:00"),  # the end: excluded
        (6, "2024-01-03 00:00:01"),
    ]
    cur.executemany(
        "INSERT INTO base.assets.erc20_token_transfers VALUES (?, CAST(? AS TIMESTAMP_NTZ), ?)",
        [(n, ts, f"0x{n:02x}") for n, ts in rows],
    )
    seed.close()

    # The worker's own connection: seeding elsewhere must be visible to it.
    conn = snowflake.connect("base", "assets")
    try:
        cur = conn.cursor()
        cur.execute(WINDOW_SQL, ("2024-01-02 00:00:00", "2024-01-03 00:00:00"))
        got = cur.fetchall()
        assert [r[0] for r in got] == [2, 3, 4]
        assert [r[2] for r in got] == ["0x02", "0x03", "0x04"]
        assert cur.sfqid

        cur.execute(WINDOW_SQL, ("2024-01-02 00:00:00", "2024-01-03 00:00:00"))
        batches = list(cur.fetch_arrow_batches())
        table = pa.concat_tables(batches)
        assert table.num_rows == 3
        assert table.column("BLOCK_NUMBER").to_pylist() == [2, 3, 4]
    finally:
        conn.close()


def test_nats_jetstream_deduplicates_by_msg_id_and_delivers(nats):
    import nats as nats_py

    async def round_trip():
        nc = await nats_py.connect(nats.endpoints()["url"])
        try:
            js = nc.jetstream()
            stream = _unique("BEAM").upper()
            await js.add_stream(name=stream, subjects=[f"{stream}.>"])
            subject = f"{stream}.transfers"
            first = await js.publish(subject, b"one", headers={"Nats-Msg-Id": "window-1:0"})
            again = await js.publish(subject, b"one", headers={"Nats-Msg-Id": "window-1:0"})
            other = await js.publish(subject, b"two", headers={"Nats-Msg-Id": "window-1:1"})
            info = await js.stream_info(stream)
            sub = await js.pull_subscribe(subject, durable="reader")
            msgs = await sub.fetch(10, timeout=5)
            for m in msgs:
                await m.ack()
            return first, again, other, info, msgs
        finally:
            await nc.close()

    first, again, other, info, msgs = asyncio.run(round_trip())
    assert not first.duplicate
    assert again.duplicate and again.seq == first.seq
    assert other.seq == first.seq + 1
    assert info.state.messages == 2
    assert [m.data for m in msgs] == [b"one", b"two"]
    assert msgs[0].headers["Nats-Msg-Id"] == "window-1:0"


def test_sns_publish_batch_arrives_in_subscribed_sqs_queue(sns):
    sns_client, sqs = sns.client("sns"), sns.client("sqs")
    topic_arn = sns_client.create_topic(Name=_unique("transfers"))["TopicArn"]
    queue_url = sqs.create_queue(QueueName=_unique("sink"))["QueueUrl"]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns_client.subscribe(
        TopicArn=topic_arn, Protocol="sqs", Endpoint=queue_arn, Attributes={"RawMessageDelivery": "true"}
    )

    bodies = {f'{{"n": {i}}}' for i in range(10)}
    result = sns_client.publish_batch(
        TopicArn=topic_arn,
        PublishBatchRequestEntries=[{"Id": str(i), "Message": f'{{"n": {i}}}'} for i in range(10)],
    )
    assert len(result["Successful"]) == 10 and result.get("Failed", []) == []

    received: list[str] = []
    for _ in range(20):
        resp = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        received += [m["Body"] for m in resp.get("Messages", [])]
        if len(received) >= 10:
            break
    assert sorted(received) == sorted(bodies)
