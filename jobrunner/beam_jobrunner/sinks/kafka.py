"""Kafka: exactly once per chunk, through one transaction per (job, destination, chunk).

The chunk's rows and its delivery marker commit atomically in the same transaction. The marker
is a consumer-group offset, committed with send_offsets_to_transaction() for a group that
belongs to this chunk alone (`beam-delivered.<job_id>.<dest>.<chunk>`, partition 0 of the data
topic, metadata = the chunk's row count): Kafka's own mechanism for "this input was processed
exactly once", with no extra topic to create. A restarted attempt
  1. init_transactions() with the same transactional.id: fences a zombie attempt and aborts
     its open transaction (or completes one that was already committing);
  2. reads the group's committed offset with a read_committed consumer (the broker answers
     only once no transactional offset commit is pending for the group);
  3. skips the chunk if the marker is there, else produces it again in a new transaction.
Killed mid-chunk: the open transaction is aborted, read_committed consumers never see it.
Killed after commit: step 2 finds the marker, nothing is sent twice.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterable

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from beam_contract.worker import Env
from beam_jobrunner import reach, termination
from beam_jobrunner.errors import PermanentError, TransientError, excerpt
from beam_jobrunner.sinks import Batch, Context, Sink

log = logging.getLogger("beam_jobrunner.kafka")

# Throughput settings measured in bench/transport.py: big lz4 batches, a short linger.
PRODUCER_TUNING = {
    "compression.type": "lz4",
    "linger.ms": 20,
    "batch.size": 1_000_000,
    "batch.num.messages": 10_000,
    "queue.buffering.max.messages": 500_000,
    "queue.buffering.max.kbytes": 512 * 1024,
    # Java clients' partitioner: the same key lands in the same partition whoever produces it.
    "partitioner": "murmur2_random",
    # Only failures come back as delivery reports: no Python callback per message.
    "delivery.report.only.error": True,
}
TRANSACTION_TIMEOUT_MS = 900_000  # the broker's default transaction.max.timeout.ms


_managed: tuple[str | None, frozenset[tuple[str, int]]] | None = None  # _managed_identity()


def transactional_id(job_id: str, dest_index: int, chunk: int) -> str:
    return f"beam-{job_id}-{dest_index}-{chunk}"


def marker_group(job_id: str, dest_index: int, chunk: int) -> str:
    return f"beam-delivered.{job_id}.{dest_index}.{chunk}"


class KafkaSink(Sink):
    def __init__(self, dest, ctx: Context, *, transactions: bool | None = None) -> None:
        super().__init__(dest, ctx)
        self.topic = dest.topic_in(ctx.namespace)
        self.bootstrap = dest.bootstrap_servers or os.environ.get(Env.KAFKA_BOOTSTRAP)
        if transactions is None:
            transactions = os.environ.get("BEAM_KAFKA_TRANSACTIONS", "true").lower() not in ("0", "false", "no")
        self.transactions = transactions
        self.headers = [("beam_job_id", ctx.job_id.encode()), ("beam_chunk", str(ctx.chunk).encode())]
        self.producer: Producer | None = None
        # The marker group's consumer: it reads the marker, and its group metadata commits the
        # marker (one client per chunk instead of two; each costs a connection and a teardown).
        self._group: Consumer | None = None
        self._errors: list[KafkaError] = []
        self._delivery_errors: list[KafkaError] = []
        self._check_brokers = False  # set by open(): a tenant's own cluster

    # --- configuration -----------------------------------------------------------------------
    def _client_conf(self) -> dict:
        if not self.bootstrap:
            raise PermanentError(
                f"{self.label}: no bootstrap_servers and no managed Kafka ({Env.KAFKA_BOOTSTRAP}) configured"
            )
        ms = int(self.ctx.connect_timeout * 1000)
        conf = {
            "bootstrap.servers": self.bootstrap,
            "socket.connection.setup.timeout.ms": ms,
            "error_cb": self._on_error,
        }
        if self.dest.secret:
            conf.update(
                {
                    "security.protocol": self.secret("security_protocol") or "SASL_SSL",
                    "sasl.mechanism": self.secret("sasl_mechanism") or "PLAIN",
                    "sasl.username": self.require_secret("sasl_username"),
                    "sasl.password": self.require_secret("sasl_password"),
                }
            )
            ca = self.secret("ssl_ca_pem")
            if ca:
                conf["ssl.ca.pem"] = ca
        return conf

    def _on_error(self, err: KafkaError) -> None:
        # Connection errors arrive here; they are retried by librdkafka and reported only if fatal.
        self._errors.append(err)

    def _on_delivery(self, err, msg) -> None:
        if err is not None:
            self._delivery_errors.append(err)

    def _unreachable(self, what: str, e: BaseException | None = None) -> TransientError:
        last = next((str(x.str()) for x in reversed(self._errors)), None) or (str(e) if e else "no answer")
        last = excerpt(last)
        return TransientError(
            f"{self.label}: {what}: broker {self.bootstrap} unreachable after {self.ctx.connect_timeout:.0f}s ({last})"
        )

    # --- lifecycle -----------------------------------------------------------------------------
    def open(self) -> None:
        conf = self._client_conf()
        # librdkafka connects in C, out of reach of the socket guard (reach.py): the tenant's
        # bootstrap servers are resolved and checked here, before any connection, and the brokers
        # the cluster advertises after the metadata request below, before anything is produced.
        # The managed Kafka (no bootstrap_servers) is the platform's.
        if self.dest.bootstrap_servers:
            reach.check_kafka_bootstrap(self.label, self.dest.bootstrap_servers)
            self._check_brokers = True
        if self.dest.secret:
            # SASL PLAIN sends the password in clear to every broker a connection is made to.
            for host, port in reach.kafka_bootstrap(self.bootstrap):
                self.check_secret_bound(host, port, "bootstrap server")
        conf.update(PRODUCER_TUNING)
        conf["enable.idempotence"] = True
        conf["on_delivery"] = self._on_delivery
        if self.transactions:
            conf["transactional.id"] = transactional_id(self.ctx.job_id, self.ctx.dest_index, self.ctx.chunk)
            conf["transaction.timeout.ms"] = TRANSACTION_TIMEOUT_MS
        self.producer = Producer(conf)
        # Metadata first, in both modes: with a broker connection up, init_transactions finds the
        # transaction coordinator at once. Without it, librdkafka retried its producer-id request
        # after 0.5 s in 4 of 12 starts against the local broker (0.06-0.08 s otherwise).
        self._metadata()
        if self.transactions:
            try:
                # Fences any earlier attempt of this chunk and resolves its open transaction.
                self.producer.init_transactions(self.ctx.connect_timeout)
            except KafkaException as e:
                raise self._fail("init_transactions", e) from None

    def _metadata(self) -> None:
        try:
            md = self.producer.list_topics(self.topic, timeout=self.ctx.connect_timeout)
        except KafkaException as e:
            raise self._unreachable("metadata", e) from None
        if self.dest.secret:
            for b in md.brokers.values():
                self.check_secret_bound(b.host, b.port, f"advertised broker {b.id}")
        if self._check_brokers:
            reach.check_kafka_brokers(self.label, md.brokers.values())
            if os.environ.get(Env.KAFKA_BOOTSTRAP):
                managed = self._managed_identity()
                reach.check_not_managed(self.label, md.cluster_id, md.brokers.values(), managed)

    def _managed_identity(self) -> tuple[str | None, frozenset[tuple[str, int]]]:
        """The managed Kafka's cluster id and broker addresses, asked once per process: what a
        tenant's cluster is compared with (reach.check_not_managed)."""
        global _managed
        if _managed is None:
            client = Producer(
                {
                    "bootstrap.servers": os.environ[Env.KAFKA_BOOTSTRAP],
                    "socket.connection.setup.timeout.ms": int(self.ctx.connect_timeout * 1000),
                }
            )
            try:
                md = client.list_topics(timeout=self.ctx.connect_timeout)
            except KafkaException as e:
                raise TransientError(
                    f"{self.label}: cannot reach the managed Kafka to tell bootstrap_servers apart from it: "
                    f"{excerpt(str(e))}"
                ) from None
            addresses: set[tuple[str, int]] = set()
            for b in md.brokers.values():
                try:
                    addresses |= reach.resolve(b.host, b.port)
                except (OSError, UnicodeError):
                    pass
            _managed = (md.cluster_id, frozenset(addresses))
        return _managed

    def _fail(self, what: str, e: KafkaException) -> Exception:
        err = e.args[0] if e.args and isinstance(e.args[0], KafkaError) else None
        if err is not None and err.code() in (
            KafkaError._TIMED_OUT,
            KafkaError._TRANSPORT,
            KafkaError._ALL_BROKERS_DOWN,
        ):
            return self._unreachable(what, e)
        if err is not None and err.code() in (
            KafkaError.TOPIC_AUTHORIZATION_FAILED,
            KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
            KafkaError.GROUP_AUTHORIZATION_FAILED,
            KafkaError.SASL_AUTHENTICATION_FAILED,
            KafkaError._AUTHENTICATION,
            KafkaError.TOPIC_EXCEPTION,
        ):
            return PermanentError(f"{self.label}: {what}: {excerpt(err.str())}")
        return TransientError(f"{self.label}: {what}: {excerpt(err.str() if err else str(e))}")

    def already_delivered(self) -> bool:
        if not self.transactions:
            return False
        consumer = self._group_consumer()
        deadline = time.monotonic() + max(self.ctx.connect_timeout, 30)
        while True:
            try:
                tp = consumer.committed([TopicPartition(self.topic, 0)], timeout=self.ctx.connect_timeout)[0]
                break
            except KafkaException as e:
                # The group coordinator may still be loading (NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS).
                if (
                    time.monotonic() > deadline
                    or not e.args[0].retriable()
                    and e.args[0].code() != KafkaError.NOT_COORDINATOR
                ):
                    raise self._fail("reading the delivery marker", e) from None
                time.sleep(0.2)
        if tp.offset >= 0:
            log.info("%s: already delivered (marker %s)", self.label, tp.metadata)
            return True
        return False

    def _group_consumer(self) -> Consumer:
        if self._group is None:
            self._group = Consumer(
                {
                    **self._client_conf(),
                    "group.id": marker_group(self.ctx.job_id, self.ctx.dest_index, self.ctx.chunk),
                    "isolation.level": "read_committed",
                    "enable.auto.commit": False,
                }
            )
        return self._group

    # transport.EncodedBatches hands this sink bytes-like messages, made in the encoding thread
    # (see serialize.encode_frame): the produce loop below is then the same
    # tightest loop as the raw produce ceiling in bench/transport.py.
    takes_bytes = True

    def fence(self, timeout: float) -> None:
        """Abort this chunk's open transaction from outside the producing thread: a second
        producer with the same transactional.id makes the coordinator abort it (termination.py)."""
        conf = {
            **self._client_conf(),
            "transactional.id": transactional_id(self.ctx.job_id, self.ctx.dest_index, self.ctx.chunk),
        }
        conf.pop("error_cb", None)
        Producer(conf).init_transactions(timeout)

    def deliver(self, batches: Iterable[Batch]) -> int:
        if not self.transactions:
            return self._deliver(batches)
        with termination.on_termination(
            f"{self.label}: aborted the open transaction of chunk {self.ctx.chunk}", self.fence
        ):
            return self._deliver(batches)

    def _deliver(self, batches: Iterable[Batch]) -> int:
        p = self.producer
        produce, poll, topic, headers = p.produce, p.poll, self.topic, self.headers
        nbytes = rows = 0
        if self.transactions:
            p.begin_transaction()
        for batch in batches:
            for value, key in zip(batch.values, batch.keys, strict=True):
                try:
                    produce(topic, value, key, headers=headers)
                except BufferError:
                    # Local queue full: let librdkafka drain it, then try again.
                    while True:
                        poll(0.1)
                        try:
                            produce(topic, value, key, headers=headers)
                            break
                        except BufferError:
                            pass
            nbytes += batch.nbytes
            # Serves the delivery-error callback; once per batch is enough (errors only).
            poll(0)
            rows += len(batch.values)
        if self.transactions:
            marker = TopicPartition(topic, 0, rows, metadata=json.dumps({"rows": rows, "bytes": nbytes}))
            group = self._group_consumer()
            try:
                p.send_offsets_to_transaction([marker], group.consumer_group_metadata(), self.ctx.connect_timeout * 2)
                p.commit_transaction(TRANSACTION_TIMEOUT_MS / 1000)
            except KafkaException as e:
                if e.args[0].txn_requires_abort():
                    p.abort_transaction(self.ctx.connect_timeout)
                raise self._fail("commit", e) from None
        else:
            remaining = p.flush(TRANSACTION_TIMEOUT_MS / 1000)
            if remaining:
                raise self._unreachable(f"{remaining} messages undelivered")
        failed = self._delivery_errors + [e for e in self._errors if e.fatal()]
        if failed:
            raise TransientError(f"{self.label}: {excerpt(failed[0].str())}")
        return nbytes

    def close(self) -> None:
        if self._group is not None:
            self._group.close()
            self._group = None
        if self.producer is not None:
            self.producer.flush(1)
            self.producer = None
