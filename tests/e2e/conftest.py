"""The whole product on a real node: the operator installed with the chart from the images the
Dockerfiles build, its staging and transport Jobs as containers, fakesnow -> fake-gcs-server ->
Apache Kafka (and a webhook receiver) on the node's address. The fixtures of the node, its
servers and the chart are the plugin's (node_cluster, node_servers, node_operator), shared with
tests/node; the ones here give them the names these tests use."""

from __future__ import annotations

import pytest
from e2e_helpers import RELEASE_NS, make_key

from beam_devstack.pytest_plugin import NODE, provision_organization
from beam_devstack.substrate.k8s import unique_name
from beam_devstack.substrate.kafka import Kafka


@pytest.fixture(scope="module")
def k8s(node_operator):
    """The real node's control plane (ControlPlane: .api, .kubectl, .create_namespace)."""
    return node_operator


@pytest.fixture(scope="module")
def kafka(node_servers):
    return node_servers["kafka"]


@pytest.fixture(scope="module")
def tenant_kafka(tmp_path_factory):
    """An organization's own Kafka cluster on the node's address, beside the managed one: a
    tenant's bootstrap_servers may not be the managed Kafka under any address (docs/security.md)."""
    own = Kafka(tmp_path_factory.mktemp("tenant-kafka"), host=NODE["node_ip"]).start()
    yield own
    own.stop()


@pytest.fixture(scope="module")
def snowflake(node_servers):
    return node_servers["snowflake"]


@pytest.fixture(scope="module")
def seeded(snowflake):
    return snowflake.connect("base", "assets")


@pytest.fixture(scope="module")
def bucket(node_servers):
    return node_servers["bucket"]


class Operator:
    """The chart's operator Pod: kill() SIGKILLs its container through containerd, as a node's
    OOM kill or crash would; start() waits for the kubelet to have restarted it and for Ready."""

    def __init__(self, plane, node) -> None:
        self.plane, self.node = plane, node
        self._restarts = 0

    def _pod(self) -> dict:
        sel = "app.kubernetes.io%2Fcomponent%3Doperator"
        [pod] = self.plane.api("GET", f"/api/v1/namespaces/beam-system/pods?labelSelector={sel}")["items"]
        return pod

    def kill(self) -> None:
        [cs] = self._pod()["status"]["containerStatuses"]
        self._restarts = cs["restartCount"]
        self.node.ctr("tasks", "kill", "--signal", "SIGKILL", cs["containerID"].removeprefix("containerd://"))

    def start(self, timeout: float = 120) -> None:
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            [cs] = self._pod()["status"]["containerStatuses"]
            if cs["restartCount"] > self._restarts and cs.get("ready"):
                return
            time.sleep(0.5)
        raise AssertionError(f"the operator's container was not restarted and Ready within {timeout:.0f}s")


@pytest.fixture(scope="module")
def operator(node_cluster, node_operator):
    return Operator(node_operator, node_cluster[1])


@pytest.fixture
def org(k8s, snowflake, request):
    """A namespace (organization) with its Snowflake Secret and the workers' ServiceAccount."""
    ns = provision_organization(k8s, snowflake, unique_name(request.node.name[:40]))
    yield ns
    k8s.delete_namespace(ns)


@pytest.fixture
def namespace_factory(k8s, snowflake, request):
    """More organizations for one test; deleted after."""
    made = []

    def make() -> str:
        ns = provision_organization(k8s, snowflake, unique_name(f"org-{len(made)}"))
        made.append(ns)
        return ns

    yield make
    for ns in made:
        k8s.delete_namespace(ns)


@pytest.fixture(scope="module")
def api_base(k8s):
    """The API Service's ClusterIP: kube-proxy routes the test's packets to the API Pod."""
    svc = k8s.api("GET", f"/api/v1/namespaces/{RELEASE_NS}/services/beam-beam-backfill-api")
    return f"http://{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"


@pytest.fixture(scope="module")
def api_url(api_base):
    return f"{api_base}/api/v1/beam"


@pytest.fixture
def key(k8s, org):
    return make_key(k8s, org)
