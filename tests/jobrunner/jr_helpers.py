"""Seeding fakesnow, running the real CLI, and reading Kafka back for the jobrunner tests."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from beam_contract.worker import LOG_TAIL_MARK, parse_failure
from beam_devstack.dataset import COLUMNS  # the table's schema: one definition for tests and demo

TABLE = "base.assets.erc20_token_transfers"
BUCKET = "beam-staging"
T0 = datetime(2024, 1, 1, 0, 0, 0)
TOKENS = [f"0x{n:040x}" for n in (0xA0B8, 0xDAC1, 0x4200, 0x833F)]
N_ROWS = 3000


def make_rows(n: int = N_ROWS) -> list[dict]:
    """Synthetic transfers: one every 10 s from T0, block = 1000 + i, four tokens in turn."""
    rows = []
    for i in range(n):
        raw = (i * 7919 % 10**6) * 10**12 + i  # large but exact in float64? not always: that is the point
        tx = f"0x{i:064x}"
        rows.append(
            {
                "from_address": f"0x{i * 31 % 2**160:040x}",
                "to_address": f"0x{i * 17 % 2**160:040x}",
                "token_address": TOKENS[i % 4],
                "token_name": ["USD Coin", "Tether", 'Wrapped "Ether"', "Ünicode ✓"][i % 4],
                "token_symbol": ["USDC", "USDT", "WETH", "UNI'"][i % 4],
                "raw_amount": float(raw),
                "amount": raw / 1e18,
                "usd_amount": (raw / 1e18) * 1.0001 if i % 5 else None,
                "usd_exchange_rate": 1.0001,
                "raw_amount_str": str(raw),
                "amount_str": str(raw / 1e18),
                "transaction_from_address": f"0x{i:040x}",
                "transaction_to_address": TOKENS[i % 4],
                "transaction_hash": tx,
                "transaction_index": i % 50,
                "log_index": i % 7,
                "block_number": 1000 + i,
                "block_timestamp": T0 + timedelta(seconds=10 * i),
                "block_hash": f"0x{1000 + i:064x}",
                "unique_id": f"{tx}-{i % 7}",
            }
        )
    return rows


def _lit(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, datetime):
        return f"'{v.isoformat(sep=' ')}'"
    if isinstance(v, (int, float)):
        return repr(v)
    return "'" + str(v).replace("'", "''") + "'"


def seed(conn, rows: list[dict], table: str = TABLE) -> None:
    cur = conn.cursor()
    db, schema, _ = table.split(".")
    cur.execute(f"CREATE DATABASE IF NOT EXISTS {db}")
    cur.execute(f"CREATE SCHEMA IF NOT EXISTS {db}.{schema}")
    cur.execute(f"CREATE OR REPLACE TABLE {table} ({', '.join(f'{c} {t}' for c, t in COLUMNS)})")
    for i in range(0, len(rows), 1000):
        values = ", ".join("(" + ", ".join(_lit(r[c]) for c, _ in COLUMNS) + ")" for r in rows[i : i + 1000])
        cur.execute(f"INSERT INTO {table} VALUES {values}")


@dataclass
class Run:
    code: int
    message: str  # the termination message's error line (or result), without the chunk line and log tail
    stderr: str
    termination: str = ""  # the whole termination message: with a failure's last log lines

    @property
    def log_tail(self) -> list[str]:
        _, mark, tail = self.termination.partition(LOG_TAIL_MARK)
        return [line for line in tail.splitlines() if line.strip()] if mark else []

    @property
    def json(self) -> dict:
        return json.loads(self.message)


NAMESPACE = "test-ns"  # the organization of every Job here


def managed(name: str) -> str:
    """The managed Kafka's topic of a kafka destination `name` (beam_contract's topic_in)."""
    return f"{NAMESPACE}.{name}"


class Job:
    """One backfill's worker env, as the operator would set it (docs/worker-contract.md)."""

    def __init__(self, tmp: Path, spec: dict, *, snowflake, gcs, kafka=None, extra: dict | None = None) -> None:
        self.tmp = tmp
        self.spec = spec
        self.job_id = str(uuid.uuid4())
        self.staging = f"gs://{BUCKET}/backfills/{NAMESPACE}/{self.job_id}/"
        sf = snowflake.endpoints()
        self.env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            # Chunk downloads of workers the fault tests kill go with the test's tmp directory,
            # as a Pod's go with its container, instead of piling up in /tmp.
            "TMPDIR": str(tmp),
            "BEAM_SPEC": json.dumps(spec),
            "BEAM_JOB_ID": self.job_id,
            "BEAM_NAMESPACE": NAMESPACE,
            "BEAM_STAGING_URI": self.staging,
            "STORAGE_EMULATOR_HOST": gcs.endpoints()["url"],
            "BEAM_CONNECT_TIMEOUT_S": "10",
            "BEAM_STAGE_STRATEGY": "fetch",
            "BEAM_CHUNK_TARGET_BYTES": "20000",
            "BEAM_CHUNK_ROW_GROUP_ROWS": "200",
            "BEAM_SNOWFLAKE_ACCOUNT": sf["account"],
            "BEAM_SNOWFLAKE_USER": sf["user"],
            "BEAM_SNOWFLAKE_PASSWORD": sf["password"],
            "BEAM_SNOWFLAKE_HOST": sf["host"],
            "BEAM_SNOWFLAKE_PORT": str(sf["port"]),
            "BEAM_SNOWFLAKE_PROTOCOL": sf["protocol"],
            "BEAM_SNOWFLAKE_DATABASE": "base",
            "BEAM_SNOWFLAKE_SCHEMA": "assets",
            # The test servers listen on loopback, where destinations may not go unless allowed
            # (docs/security.md, "What a destination may reach"); test_jobrunner_reach.py unsets it.
            "BEAM_DESTINATION_ALLOW": "127.0.0.0/8,::1/128",
            # The backfill's staged-data key, as the operator gives every worker (seal.py).
            "BEAM_STAGING_KEY": base64.b64encode(os.urandom(32)).decode(),
        }
        if kafka is not None:
            self.env["BEAM_KAFKA_BOOTSTRAP"] = kafka.bootstrap
        self.env.update(extra or {})
        self._n = 0

    def _argv_env(self, command: str, env: dict) -> tuple[list[str], dict, Path]:
        self._n += 1
        term = self.tmp / f"termination-{self.job_id[:8]}-{self._n}"
        e = {**self.env, "TERMINATION_MESSAGE_PATH": str(term), **{k: str(v) for k, v in env.items()}}
        return [sys.executable, "-m", "beam_jobrunner", command], e, term

    def run(self, command: str, **env) -> Run:
        argv, e, term = self._argv_env(command, env)
        p = subprocess.run(argv, env=e, capture_output=True, text=True, timeout=300)
        message = term.read_text() if term.exists() else ""
        return Run(p.returncode, parse_failure(message)[0], p.stderr, message)

    def start(self, command: str, **env) -> subprocess.Popen:
        """The worker as a running process, for tests that inject a fault from outside (a signal)."""
        argv, e, _ = self._argv_env(command, env)
        return subprocess.Popen(argv, env=e, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stage(self, **env) -> Run:
        r = self.run("stage", **env)
        assert r.code == 0, r.stderr[-3000:]
        return r

    def transport(self, chunk: int, **env) -> Run:
        return self.run("transport", JOB_COMPLETION_INDEX=chunk, **env)

    def transport_all(self, num_chunks: int) -> None:
        for i in range(num_chunks):
            r = self.transport(i)
            assert r.code == 0, r.stderr[-3000:]


def expected_ids(rows, start=None, end=None, blocks=None, tokens=None) -> list[str]:
    out = []
    for r in rows:
        if start is not None and not (start <= r["block_timestamp"] < end):
            continue
        if blocks is not None and not (blocks[0] <= r["block_number"] < blocks[1]):
            continue
        if tokens is not None and r["token_address"] not in tokens:
            continue
        out.append(r["unique_id"])
    return out


def nats_stream(nats) -> str:
    """The subject of a fresh JetStream stream on the test's nats-server."""
    import asyncio

    import nats as nats_py

    subject = f"beam.{uuid.uuid4().hex[:8]}"

    async def make_stream():
        nc = await nats_py.connect(nats.endpoints()["url"])
        await nc.jetstream().add_stream(name=subject.replace(".", "_"), subjects=[subject])
        await nc.close()

    asyncio.run(make_stream())
    return subject


def read_nats(nats, subject: str) -> list[tuple[str | None, dict]]:
    """Every message of the subject's stream, as (Nats-Msg-Id, JSON body), acknowledged."""
    import asyncio

    import nats as nats_py

    async def read_back():
        nc = await nats_py.connect(nats.endpoints()["url"])
        sub = await nc.jetstream().pull_subscribe(subject, durable=None)
        out = []
        while True:
            try:
                msgs = await sub.fetch(500, timeout=5)
            except TimeoutError:  # nats-py raises its own subclass or asyncio's
                break
            for m in msgs:
                out.append(((m.headers or {}).get("Nats-Msg-Id"), json.loads(m.data)))
                await m.ack()
        await nc.close()
        return out

    return asyncio.run(read_back())


def sns_topic_to_queue(sns, *, fifo: bool = False) -> tuple[str, str]:
    """An SNS topic (moto) whose messages land raw in an SQS queue: (topic ARN, queue URL)."""
    sns_c, sqs_c = sns.client("sns"), sns.client("sqs")
    name = f"beam-{uuid.uuid4().hex[:8]}" + (".fifo" if fifo else "")
    attrs = {"FifoTopic": "true", "ContentBasedDeduplication": "false"} if fifo else {}
    arn = sns_c.create_topic(Name=name, Attributes=attrs)["TopicArn"]
    q = sqs_c.create_queue(QueueName=name, Attributes={"FifoQueue": "true"} if fifo else {})["QueueUrl"]
    qarn = sqs_c.get_queue_attributes(QueueUrl=q, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    sns_c.subscribe(TopicArn=arn, Protocol="sqs", Endpoint=qarn, Attributes={"RawMessageDelivery": "true"})
    return arn, q


def drain_queue(sns, queue_url: str) -> list[dict]:
    """The JSON bodies of every message waiting in the queue, deleted as they are read."""
    sqs_c = sns.client("sqs")
    got = []
    while True:
        msgs = sqs_c.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=0).get("Messages", [])
        if not msgs:
            return got
        got.extend(json.loads(m["Body"]) for m in msgs)
        sqs_c.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(msgs)],
        )
