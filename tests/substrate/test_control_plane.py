"""The local control plane behaves like a cluster where the operator relies on it: kubectl
works, RBAC is enforced, owned objects are garbage collected, finished Jobs expire."""

from __future__ import annotations

import json
import time

import pytest
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from beam_devstack.substrate.k8s import K8S_VERSION, ApiError, ControlPlane
from beam_devstack.substrate.proc import port_open

pytestmark = pytest.mark.k8s


def eventually(check, timeout: float = 60, what: str = "condition"):
    """Poll until check() returns something truthy; controllers act asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(0.2)


def python_client(kubeconfig) -> client.ApiClient:
    return config.new_client_from_config(config_file=str(kubeconfig))


def test_kubectl_talks_to_server_of_the_pinned_version(k8s):
    names = k8s.kubectl("get", "namespaces", "-o", "name").stdout.split()
    assert {"namespace/default", "namespace/kube-system"} <= set(names)

    version = json.loads(k8s.kubectl("version", "-o", "json").stdout)
    assert version["serverVersion"]["gitVersion"] == K8S_VERSION

    # The Python client (and kopf, which reads the same file) accepts the admin kubeconfig.
    listed = client.CoreV1Api(python_client(k8s.kubeconfig)).list_namespace()
    assert "default" in {ns.metadata.name for ns in listed.items}

    assert k8s.endpoints() == {"kubeconfig": str(k8s.kubeconfig), "server": k8s.server}
    assert k8s.server.startswith("https://127.0.0.1:")


def test_service_account_is_confined_by_rbac(k8s, namespace):
    sa_kubeconfig = k8s.kubeconfig_for_service_account(namespace, "reader")
    core = client.CoreV1Api(python_client(sa_kubeconfig))

    with pytest.raises(ApiException) as denied:
        core.list_namespaced_pod(namespace)
    assert denied.value.status == 403
    denied_cli = k8s.kubectl("get", "pods", "-n", namespace, kubeconfig=sa_kubeconfig, check=False)
    assert denied_cli.returncode != 0 and "forbidden" in denied_cli.stderr.lower()

    k8s.kubectl("create", "role", "pod-reader", "-n", namespace, "--verb=get,list,watch", "--resource=pods")
    k8s.kubectl(
        "create",
        "rolebinding",
        "reader-reads-pods",
        "-n",
        namespace,
        "--role=pod-reader",
        f"--serviceaccount={namespace}:reader",
    )

    def allowed():
        try:
            return core.list_namespaced_pod(namespace) is not None
        except ApiException as e:
            if e.status != 403:
                raise
            return False

    eventually(allowed, 30, "pod listing allowed after the RoleBinding")
    assert k8s.kubectl("get", "pods", "-n", namespace, kubeconfig=sa_kubeconfig).returncode == 0

    # The Role is namespaced: other namespaces and other verbs stay closed.
    with pytest.raises(ApiException) as elsewhere:
        core.list_namespaced_pod("default")
    assert elsewhere.value.status == 403
    with pytest.raises(ApiException) as no_delete:
        core.delete_collection_namespaced_pod(namespace)
    assert no_delete.value.status == 403


def _job(name: str, **spec) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    # This control plane has no node, and no scheduler serves this name
                    # anyway: the Pods stay Pending, which is all the garbage collector test
                    # needs. Whatever needs a Pod to run is in tests/node, on a real kubelet.
                    "schedulerName": "unscheduled",
                    "containers": [{"name": "main", "image": "busybox", "command": ["true"]}],
                }
            },
            **spec,
        },
    }


def _pods_of(k8s, namespace: str, job: str) -> list[dict]:
    return k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=job-name%3D{job}")["items"]


def _gone(k8s, path: str) -> bool:
    try:
        k8s.api("GET", path)
        return False
    except ApiError as e:
        if e.status == 404:
            return True
        raise


def test_garbage_collector_deletes_job_and_pods_with_their_owner(k8s, namespace):
    owner = k8s.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "owner"}},
    )
    job = _job("owned")
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner["metadata"]["uid"]}
    ]
    k8s.api("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", job)

    # The Job controller runs: it creates the Pod (Pending forever, no node here).
    pods = eventually(lambda: _pods_of(k8s, namespace, "owned"), 60, "Job controller creating a Pod")
    assert pods[0]["metadata"]["ownerReferences"][0]["kind"] == "Job"

    k8s.api(
        "DELETE",
        f"/api/v1/namespaces/{namespace}/configmaps/owner",
        {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"},
    )

    eventually(lambda: _gone(k8s, f"/apis/batch/v1/namespaces/{namespace}/jobs/owned"), 60, "Job collected")
    eventually(lambda: not _pods_of(k8s, namespace, "owned"), 60, "Pods collected")


def test_apiserver_restart_keeps_state_and_stop_leaves_nothing(tmp_path):
    plane = ControlPlane(tmp_path / "k8s").start()
    try:
        plane.api(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "survivor"}, "data": {"k": "v"}},
        )
        server = plane.server
        plane.restart_apiserver()
        assert plane.server == server
        got = plane.kubectl("get", "configmap", "survivor", "-o", "jsonpath={.data.k}").stdout
        assert got == "v"
        # The controller manager reconnects by itself: a new namespace still gets its ServiceAccount.
        plane.create_namespace("after-restart")
    finally:
        procs = [plane.etcd, plane.apiserver, plane.controller_manager]
        ports = [plane.etcd_port, plane.port, plane.kcm_port]
        plane.stop()
    assert not any(p.alive() for p in procs)
    assert not any(port_open(port) for port in ports)
