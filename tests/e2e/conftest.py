"""The whole product on the local stack: real operator (chart RBAC), real jobrunner Pods run by
the node agent, fakesnow → fake-gcs-server → Apache Kafka (and a webhook receiver)."""

from __future__ import annotations

import json

import pytest

from beam_devstack import dataset
from beam_devstack.operator_proc import OperatorProcess, helm_binary, install_chart_rbac, install_crd
from beam_devstack.snowflake import connection_secret

BUCKET = "beam-e2e"
ROWS = 24_000  # about 8,000 USDC rows in March 2026


@pytest.fixture(scope="module")
def seeded(snowflake):
    conn = snowflake.connect("base", "assets")
    dataset.load(conn, ROWS)
    return conn


@pytest.fixture(scope="module")
def bucket(gcs):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(
        project="e2e", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.endpoints()["url"]}
    )
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
            # Through the stack's proxy, which the kill test uses to hold commits (kafka_proxy.py).
            "BEAM_MANAGED_KAFKA_BOOTSTRAP": kafka.proxy.bootstrap,
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
    k8s.api("POST", f"/api/v1/namespaces/{namespace}/secrets", connection_secret(snowflake.endpoints()))
    return namespace


@pytest.fixture
def namespace_factory(k8s, snowflake, request):
    """More organizations for one test, each with its Snowflake Secret; deleted after."""
    from beam_devstack.k8s import unique_name

    made = []

    def make() -> str:
        ns = k8s.create_namespace(unique_name(f"org-{len(made)}"))
        made.append(ns)
        k8s.api("POST", f"/api/v1/namespaces/{ns}/secrets", connection_secret(snowflake.endpoints()))
        return ns

    yield make
    for ns in made:
        k8s.delete_namespace(ns)
