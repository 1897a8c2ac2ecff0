"""A real node (kubelet + containerd + runc, beam_devstack.node) next to its own control plane,
with the servers that Pods use bound on the node's bridge address, and the operator installed
with `helm install` from the images the Dockerfiles build (beam_devstack.images)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

from beam_devstack import dataset, images, k8s
from beam_devstack.gcs import FakeGcs
from beam_devstack.kafka import Kafka
from beam_devstack.node import Node, NodeSettings
from beam_devstack.operator_proc import CHART, helm_binary, install_crd
from beam_devstack.snowflake import FakeSnowflake, connection_secret

# Private ranges on a bridge of the suite's own; the node's guard chain drops anything else.
NODE = {"bridge": "beamtest0", "node_ip": "10.213.9.1", "pod_cidr": "10.213.9.0/24"}
BUCKET = "beam-node"
ROWS = 30_000  # about 10,000 USDC rows in March 2026: 2 chunks or more of the chart's smallest 1 MiB


@pytest.fixture(scope="session")
def cluster():
    """(control plane, node): Pods are real containers; kube-apiserver is on the bridge address."""
    # A short path: containerd's socket lives under it, and a unix socket path has 108 bytes.
    run = Path(tempfile.mkdtemp(prefix="bbn", dir="/tmp"))
    settings = NodeSettings(state_dir=run / "node", service_cidr=k8s.SERVICE_CIDR, images=images.ensure_built(), **NODE)
    node = Node(settings)
    plane = k8s.ControlPlane(run / "cp", node_ip=settings.node_ip)
    try:
        node.prepare_network()
        plane.start()
        settings.apiserver_url, settings.ca_cert, settings.ca_key = (
            plane.server,
            plane.pki / "ca.crt",
            plane.pki / "ca.key",
        )
        node.start()
        yield plane, node
    finally:
        node.stop_workloads()
        plane.stop()
        node.stop()
        shutil.rmtree(run, ignore_errors=True)


@pytest.fixture(scope="session")
def servers(cluster, tmp_path_factory):
    """fakesnow, fake-gcs-server and Kafka where Pods reach them: on the node's address."""
    run = tmp_path_factory.mktemp("node-servers")
    host = NODE["node_ip"]
    snowflake = FakeSnowflake(run, host=host).start()
    gcs = FakeGcs(run, host=host).start()
    kafka = Kafka(run, host=host).start()
    try:
        dataset.load(snowflake.connect("base", "assets"), ROWS)
        yield {"snowflake": snowflake, "gcs": gcs, "kafka": kafka}
    finally:
        kafka.stop()
        gcs.stop()
        snowflake.stop()


@pytest.fixture(scope="session")
def installed(cluster, servers):
    """The chart, installed as a user installs it, with the images built from the Dockerfiles."""
    plane, _ = cluster
    install_crd(plane)
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    gcs = servers["gcs"]
    client = storage.Client(project="t", credentials=AnonymousCredentials(), client_options={"api_endpoint": gcs.url})
    client.create_bucket(BUCKET)
    # pullPolicy Never: a missing image must fail here, not send containerd to a registry off
    # the machine.
    values = {
        "operator": {
            "image": {"repository": images.OPERATOR.repository, "tag": images.OPERATOR.tag(), "pullPolicy": "Never"}
        },
        "jobrunner": {
            "image": {"repository": images.JOBRUNNER.repository, "tag": images.JOBRUNNER.tag(), "pullPolicy": "Never"}
        },
        "config": {
            "stage_strategy": "fetch",
            "staging_bucket": BUCKET,
            "gcs_endpoint": gcs.url,
            # Through the stack's Kafka proxy, which the kill test uses to hold commits.
            "managed_kafka_bootstrap": servers["kafka"].proxy.bootstrap,
            "chunk_target_bytes": 1048576,
            "connect_timeout_seconds": 15,
            # Chunks are cut between row groups: small ones, so that a March of USDC makes several.
            "worker_env": {"BEAM_CHUNK_ROW_GROUP_ROWS": "1000"},
        },
    }
    values_file = plane.run_dir / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    argv = [
        helm_binary(),
        "install",
        "beam",
        str(CHART),
        "--kubeconfig",
        str(plane.kubeconfig),
        "--values",
        str(values_file),
    ]
    argv += ["--namespace", "beam-system", "--create-namespace", "--wait", "--timeout", "180s"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, (
        done.stdout + done.stderr + plane.kubectl("-n", "beam-system", "describe", "pods").stdout
    )
    return plane


@pytest.fixture
def org(installed, servers):
    """An organization as an administrator provisions one (the chart's README): its Snowflake
    Secret and the workers' ServiceAccount (a Pod can only use one of its own namespace)."""
    ns = installed.create_namespace(k8s.unique_name("org"))
    installed.api("POST", f"/api/v1/namespaces/{ns}/secrets", connection_secret(servers["snowflake"].endpoints()))
    worker = {"metadata": {"name": "beam-beam-backfill-worker"}, "automountServiceAccountToken": False}
    installed.api(
        "POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"apiVersion": "v1", "kind": "ServiceAccount", **worker}
    )
    return ns
