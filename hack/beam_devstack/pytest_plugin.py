"""Session-scoped pytest fixtures: one real server of each kind per test session.

Each fixture starts its server on a free 127.0.0.1 port under the session's tmp dir and stops
it at the end of the session (and, through proc.ManagedProcess, on any exit of pytest).
"""

from __future__ import annotations

import pytest

# --- Kubernetes control plane (beam_devstack.k8s) ------------------------------------------


@pytest.fixture(scope="session")
def k8s(tmp_path_factory):
    """etcd + kube-apiserver + kube-controller-manager; .kubeconfig (admin), .server,
    .kubectl(...), .api(...), .kubeconfig_for_service_account(ns, name)."""
    from beam_devstack.k8s import ControlPlane

    plane = ControlPlane(tmp_path_factory.mktemp("k8s"))
    plane.start()
    yield plane
    plane.stop()


@pytest.fixture
def namespace(k8s, request):
    """A fresh namespace named after the test, with its default ServiceAccount; deleted after."""
    from beam_devstack.k8s import unique_name

    name = k8s.create_namespace(unique_name(request.node.name[:40]))
    yield name
    k8s.delete_namespace(name)


# --- node agent (beam_devstack.nodeagent) ---------------------------------------------------


@pytest.fixture(scope="session")
def node_agent(k8s, tmp_path_factory):
    """One Ready Node `local-node` whose Pods run as host processes; .log_dir,
    .pod_log_path(ns, pod), endpoints()["node_name"|"log_dir"|"log"]."""
    from beam_devstack.nodeagent import NodeAgent

    agent = NodeAgent(tmp_path_factory.mktemp("nodeagent"), kubeconfig=k8s.endpoints()["kubeconfig"])
    agent.start()
    yield agent
    agent.stop()


# --- brokers: Kafka, fake-gcs-server, fakesnow, NATS, SNS ------------------------------------


def _broker(module: str, cls: str, tmp_path_factory):
    import importlib

    server = getattr(importlib.import_module(f"beam_devstack.{module}"), cls)(tmp_path_factory.mktemp(module))
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
