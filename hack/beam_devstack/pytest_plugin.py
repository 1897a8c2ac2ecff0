"""Session-scoped pytest fixtures: one real server of each kind per test session.

Each fixture starts its server on a free 127.0.0.1 port under the session's tmp dir and stops
it at the end of the session (and, through proc.ManagedProcess, on any exit of pytest).
"""

from __future__ import annotations

import pytest

# --- Kubernetes control plane (beam_devstack.substrate.k8s) --------------------------------


@pytest.fixture(scope="session")
def k8s(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager; .kubeconfig (admin), .server,
    .kubectl(...), .api(...), .kubeconfig_for_service_account(ns, name)."""
    from beam_devstack.substrate.k8s import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture
def namespace(k8s, request):
    """A fresh namespace named after the test, with its default ServiceAccount; deleted after."""
    from beam_devstack.substrate.k8s import unique_name

    name = k8s.create_namespace(unique_name(request.node.name[:40]))
    yield name
    k8s.delete_namespace(name)


# --- brokers: Kafka, fake-gcs-server, fakesnow, NATS, SNS ------------------------------------


def _broker(module: str, cls: str, tmp_path_factory):
    import importlib

    server_class = getattr(importlib.import_module(f"beam_devstack.substrate.{module}"), cls)
    server = server_class(tmp_path_factory.mktemp(module))
    server.start()
    return server


@pytest.fixture(scope="session")
def kafka(tmp_path_factory):
    """A one-node Apache Kafka 4.x (KRaft); .bootstrap / endpoints()["bootstrap"]."""
    server = _broker("kafka", "Kafka", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs(tmp_path_factory):
    """fake-gcs-server; endpoints()["url"] is STORAGE_EMULATOR_HOST, ["host_port"] pyarrow's endpoint_override."""
    server = _broker("gcs", "FakeGcs", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def snowflake(tmp_path_factory):
    """fakesnow's server; .connect(database, schema) gives a snowflake.connector connection."""
    server = _broker("snowflake", "FakeSnowflake", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def nats(tmp_path_factory):
    """nats-server with JetStream; endpoints()["url"]."""
    server = _broker("nats", "Nats", tmp_path_factory)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sns(tmp_path_factory):
    """moto serving SNS and SQS; .client("sns"|"sqs") gives a boto3 client for it."""
    server = _broker("sns", "Sns", tmp_path_factory)
    yield server
    server.stop()


# --- a real node, its servers and the chart (substrate.node, beam_devstack.images) ----------
# One per session, shared by every test directory that uses it: one node runs per machine, and
# one operator watches the whole cluster.

# Private ranges on a bridge of the suite's own; the node's guard chain drops anything else.
NODE = {"bridge": "beamtest0", "node_ip": "10.213.9.1", "pod_cidr": "10.213.9.0/24"}
NODE_BUCKET = "beam-node"
# About 33,000 USDC rows in March 2026: 6 chunks of the chart's smallest chunk size (1 MiB).
NODE_ROWS = 100_000
# The second table is allowed but missing from the warehouse: staging must say so.
MISSING_TABLE_SUFFIX = "_v9"


@pytest.fixture(scope="session")
def node_cluster():
    """(control plane, node): Pods are real containers; kube-apiserver is on the bridge address."""
    import shutil
    import tempfile
    from pathlib import Path

    from beam_devstack import images
    from beam_devstack.substrate import k8s
    from beam_devstack.substrate.node import Node, NodeSettings

    # A short path: containerd's socket lives under it, and a unix socket path has 108 bytes.
    run = Path(tempfile.mkdtemp(prefix="bbn", dir="/tmp"))
    settings = NodeSettings(state_dir=run / "node", service_cidr=k8s.SERVICE_CIDR, images=images.ensure_built(), **NODE)
    node = Node(settings)
    plane = k8s.ControlPlane(run / "cp", node_ip=settings.node_ip)
    try:
        node.prepare_network()
        plane.start()
        node.join(plane)
        yield plane, node
    finally:
        node.stop_workloads()
        plane.stop()
        node.stop()
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="session")
def node_servers(node_cluster, tmp_path_factory):
    """fakesnow (with the synthetic transfers), fake-gcs-server (with the staging bucket) and
    Kafka where Pods reach them: on the node's address."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    from beam_devstack import dataset
    from beam_devstack.substrate.gcs import FakeGcs
    from beam_devstack.substrate.kafka import Kafka
    from beam_devstack.substrate.snowflake import FakeSnowflake

    run = tmp_path_factory.mktemp("node-servers")
    host = NODE["node_ip"]
    started = []
    try:
        for server in (FakeSnowflake(run, host=host), FakeGcs(run, host=host), Kafka(run, host=host)):
            started.append(server.start())
        snowflake, gcs, kafka = started
        dataset.load(snowflake.connect("base", "assets"), NODE_ROWS)
        client = storage.Client(
            project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url}
        )
        client.create_bucket(NODE_BUCKET)
        yield {"snowflake": snowflake, "gcs": gcs, "kafka": kafka, "bucket": client.bucket(NODE_BUCKET)}
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture(scope="session")
def node_operator(node_cluster, node_servers):
    """The chart, installed with helm as a user installs it, from the images the Dockerfiles
    build; returns the control plane. pullPolicy Never: a missing image must fail here, not send
    containerd to a registry off the machine."""
    import subprocess

    import yaml

    from beam_devstack import dataset, images
    from beam_devstack.operator_proc import CHART, helm_binary, install_crd
    from beam_devstack.substrate import k8s

    plane, _ = node_cluster
    install_crd(plane)

    def image(img) -> dict:
        return {"repository": img.repository, "tag": img.tag(), "pullPolicy": "Never"}

    values = {
        "operator": {"image": image(images.OPERATOR)},
        "jobrunner": {"image": image(images.JOBRUNNER)},
        # The REST API as its Deployment behind its Service; tests poll it next to kubectl.
        "api": {"enabled": True, "rateLimit": {"perSecond": 50, "burst": 100}, "keyCacheSeconds": 1},
        "config": {
            "stage_strategy": "fetch",
            "staging_bucket": NODE_BUCKET,
            "gcs_endpoint": node_servers["gcs"].url,
            # Through the stack's Kafka proxy, which fault tests use to hold commits.
            "managed_kafka_bootstrap": node_servers["kafka"].proxy.bootstrap,
            # The stack's servers (webhook receivers, NATS, moto, the SASL_SSL Kafka) listen on
            # the node's bridge address: the one inward address destinations may reach here.
            "destination_allow": [f"{NODE['node_ip']}/32"],
            "cluster_cidrs": [NODE["pod_cidr"], k8s.SERVICE_CIDR],
            "allowed_tables": [dataset.TABLE, dataset.TABLE + MISSING_TABLE_SUFFIX],
            "chunk_target_bytes": 1048576,
            "connect_timeout_seconds": 15,
            # Stuck Pods (unschedulable, Pods refused) fail a backfill after 10 s, not 5 minutes.
            "stuck_pod_seconds": 10,
            "unschedulable_seconds": 10,
            "job_ttl_seconds": 600,
            # Chunks are cut between row groups: small ones, so that a March of USDC makes several.
            "worker_env": {"BEAM_CHUNK_ROW_GROUP_ROWS": "1000"},
        },
    }
    values_file = plane.run_dir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    argv = [helm_binary(), "install", "beam", str(CHART), "--kubeconfig", str(plane.kubeconfig)]
    argv += ["--values", str(values_file), "--namespace", "beam-system", "--create-namespace", "--wait"]
    done = subprocess.run([*argv, "--timeout", "180s"], capture_output=True, text=True, timeout=240)
    pods = "" if done.returncode == 0 else plane.kubectl("-n", "beam-system", "describe", "pods", check=False).stdout
    assert done.returncode == 0, done.stdout + done.stderr + pods
    return plane


def provision_organization(plane, snowflake, name: str) -> str:
    """An organization as an administrator provisions one (the chart's README): a namespace, its
    Snowflake Secret, and the workers' ServiceAccount (a Pod uses one of its own namespace)."""
    from beam_devstack.snowflake_secret import connection_secret

    ns = plane.create_namespace(name)
    plane.api("POST", f"/api/v1/namespaces/{ns}/secrets", connection_secret(snowflake.endpoints()))
    worker = {"apiVersion": "v1", "kind": "ServiceAccount", "automountServiceAccountToken": False}
    plane.api(
        "POST",
        f"/api/v1/namespaces/{ns}/serviceaccounts",
        {**worker, "metadata": {"name": "beam-beam-backfill-worker"}},
    )
    return ns


# --- a headless browser for the web console (beam_devstack.substrate.browser) ----------------


@pytest.fixture
def browser():
    """Debian's headless Chromium under Selenium, fresh profile per test, quit after;
    beam_devstack.substrate.browser.console_errors(driver) and .save_screenshot(driver, path)
    read it."""
    from beam_devstack.substrate.browser import chromium

    with chromium() as driver:
        yield driver
