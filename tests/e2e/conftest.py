"""The whole product on the local stack: real operator (chart RBAC), real jobrunner Pods run by
the node agent, fakesnow → fake-gcs-server → Apache Kafka (and a webhook receiver)."""

from __future__ import annotations

import base64
import json
import time
import urllib.parse
import uuid

import pytest

from beam_devstack import dataset
from beam_devstack.operator_proc import OperatorProcess, helm_binary, install_chart_rbac, install_crd

BUCKET = "beam-e2e"
ROWS = 24_000  # about 8,000 USDC rows in March 2026
WINDOW = {"partition_key": "block_timestamp", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}


@pytest.fixture(scope="module")
def seeded(snowflake):
    conn = snowflake.connect("base", "assets")
    dataset.load(conn, ROWS)
    return conn


@pytest.fixture(scope="module")
def bucket(gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="e2e", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.endpoints()["url"]})
    if client.lookup_bucket(BUCKET) is None:
        client.create_bucket(BUCKET)
    return client.bucket(BUCKET)


@pytest.fixture(scope="module")
def operator(k8s, node_agent, kafka, gcs, seeded, bucket, tmp_path_factory):
    install_crd(k8s)
    kubeconfig = install_chart_rbac(k8s, helm_binary(), namespace="beam-e2e", release="e2e")
    op = OperatorProcess(
        tmp_path_factory.mktemp("e2e-operator"),
        kubeconfig=kubeconfig,
        config={
            "BEAM_JOBRUNNER_IMAGE": "beam-backfill/jobrunner:e2e",
            "BEAM_STAGE_STRATEGY": "fetch",
            "BEAM_GCS_ENDPOINT": gcs.endpoints()["url"],
            "BEAM_STAGING_BUCKET": BUCKET,
            "BEAM_MANAGED_KAFKA_BOOTSTRAP": kafka.bootstrap,
            # The second table is allowed but missing from the warehouse: staging must say so.
            "BEAM_ALLOWED_TABLES": f"{dataset.TABLE},{dataset.TABLE}_v9",
            # ~1,000-row chunks: a March of USDC makes about 8, enough to act mid-transport.
            "BEAM_CHUNK_TARGET_BYTES": "1",
            "BEAM_WORKER_ENV": json.dumps({"BEAM_CHUNK_ROW_GROUP_ROWS": "1000"}),
            "BEAM_CONNECT_TIMEOUT_SECONDS": "15",
            "BEAM_JOB_TTL_SECONDS": "600",
        },
    ).start()
    yield op
    op.stop()


@pytest.fixture
def org(k8s, namespace, snowflake):
    """A namespace (organization) with its Snowflake Secret, as an administrator would set it up."""
    sf = snowflake.endpoints()
    data = {"account": sf["account"], "user": sf["user"], "password": sf["password"], "host": sf["host"],
            "port": str(sf["port"]), "protocol": sf["protocol"], "database": "base", "schema": "assets"}
    k8s.api("POST", f"/api/v1/namespaces/{namespace}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "beam-snowflake"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    })
    return namespace


def expected_ids(conn, window=WINDOW, token=dataset.USDC) -> set[str]:
    cur = conn.cursor()
    cur.execute(
        f"SELECT unique_id FROM {dataset.TABLE} WHERE block_timestamp >= CAST(? AS TIMESTAMP_NTZ) "
        "AND block_timestamp < CAST(? AS TIMESTAMP_NTZ) AND token_address IN (?)",
        [window["start"], window["end"], token],
    )
    return {r[0] for r in cur.fetchall()}


def read_topic(bootstrap: str, topic: str, *, idle: float = 3.0) -> list[tuple[str, dict]]:
    """Every committed message of `topic` (read_committed), as (key, value)."""
    from confluent_kafka import Consumer, KafkaException

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"e2e-{uuid.uuid4()}", "isolation.level": "read_committed",
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    try:
        try:
            md = c.list_topics(topic, timeout=10)
        except KafkaException:
            return []
        if topic not in md.topics or md.topics[topic].error is not None:
            return []
        c.subscribe([topic])
        out, last = [], time.monotonic()
        while time.monotonic() - last < idle:
            for m in c.consume(5000, timeout=0.5):
                if m.error():
                    continue
                out.append((m.key().decode(), json.loads(m.value())))
                last = time.monotonic()
        return out
    finally:
        c.close()


def backfill(name: str, topic: str, window=WINDOW, **spec) -> dict:
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1", "kind": "BeamBackfill", "metadata": {"name": name},
        "spec": {
            "job_name": f"e2e {name}", "table": dataset.TABLE, "backfill_window": window,
            "filter": {"column": "token_address", "values": [dataset.USDC]},
            "destinations": [{"type": "kafka", "name": topic}], **spec,
        },
    }


def staged_objects(bucket, namespace: str, uid: str) -> list[str]:
    return [b.name for b in bucket.client.list_blobs(bucket.name, prefix=f"backfills/{namespace}/{uid}/")]


def pods_of(k8s, namespace: str, uid: str) -> list[dict]:
    sel = urllib.parse.quote(f"beam-backfill.dev/job-id={uid}")
    return k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={sel}")["items"]


@pytest.fixture
def namespace_factory(k8s, snowflake, request):
    """More organizations for one test, each with its Snowflake Secret; deleted after."""
    from beam_devstack.k8s import unique_name

    made = []

    def make() -> str:
        ns = k8s.create_namespace(unique_name(f"org-{len(made)}"))
        made.append(ns)
        sf = snowflake.endpoints()
        data = {"account": sf["account"], "user": sf["user"], "password": sf["password"], "host": sf["host"],
                "port": str(sf["port"]), "protocol": sf["protocol"], "database": "base", "schema": "assets"}
        k8s.api("POST", f"/api/v1/namespaces/{ns}/secrets", {
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "beam-snowflake"},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        })
        return ns

    yield make
    for ns in made:
        k8s.delete_namespace(ns)
