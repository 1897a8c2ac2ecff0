"""The node agent plays the kubelet well enough for the real Job controller and garbage collector:
Pods of Jobs run as host processes, their exit codes, termination messages and deletions reach
the API as a kubelet would write them."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from beam_devstack.k8s import ApiError
from beam_devstack.nodeagent import NodeAgent, expand, image_repository, load_images, resolve_image

pytestmark = pytest.mark.k8s


def eventually(check, timeout: float = 90, what: str = "condition"):
    """Poll until check() returns something truthy: controllers and the agent act asynchronously."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(0.2)


def py_container(code: str, *args: str, **extra) -> dict:
    return {"name": "main", "image": "python:3.11", "command": ["python", "-c", code, *args], **extra}


def make_pod(k8s, namespace: str, name: str, container: dict, **spec) -> dict:
    body = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "agent-test"}, "annotations": {"note": "hello"}},
        "spec": {"restartPolicy": "Never", "containers": [container], **spec},
    }
    return k8s.api("POST", f"/api/v1/namespaces/{namespace}/pods", body)


def make_job(k8s, namespace: str, name: str, container: dict, **spec) -> dict:
    body = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {**spec, "template": {"spec": {"restartPolicy": "Never", "containers": [container]}}},
    }
    return k8s.api("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body)


def get_pod(k8s, namespace: str, name: str) -> dict | None:
    try:
        return k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods/{name}")
    except ApiError as e:
        if e.status == 404:
            return None
        raise


def finished_pod(k8s, namespace: str, name: str) -> dict:
    def done():
        pod = get_pod(k8s, namespace, name)
        return pod if pod and pod["status"].get("phase") in ("Succeeded", "Failed") else None

    return eventually(done, what=f"pod {name} finished")


def job_condition(k8s, namespace: str, name: str, *types: str) -> dict:
    def done():
        job = k8s.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/{name}")
        conds = {c["type"] for c in job["status"].get("conditions", []) if c["status"] == "True"}
        return job if conds & set(types) else None

    return eventually(done, what=f"job {name} {'/'.join(types)}")


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# --- pure functions ---------------------------------------------------------------------------


def test_variable_expansion_follows_kubernetes():
    env = {"A": "1", "EMPTY": ""}
    assert expand("$(A)-$(EMPTY)-$(MISSING)", env) == "1--$(MISSING)"
    assert expand("$$(A) costs $$5 and $x", env) == "$(A) costs $5 and $x"
    assert expand("$(A", env) == "$(A"


def test_image_table_matches_repositories():
    table = load_images(None)
    assert image_repository("docker.io/library/python:3.11-slim") == "python"
    assert (
        image_repository("localhost:5000/beam-backfill/jobrunner@sha256:abc")
        == "localhost:5000/beam-backfill/jobrunner"
    )
    assert resolve_image("beam-backfill/jobrunner:dev", table)["entrypoint"] == ["beam-jobrunner"]
    assert resolve_image("beam-backfill/anything:1", table)["venv"] is True
    assert resolve_image("nginx:1.27", table) is None


# --- against the control plane ----------------------------------------------------------------


def test_node_is_ready_with_a_renewed_lease(k8s, node_agent):
    node = k8s.api("GET", "/api/v1/nodes/local-node")
    ready = [c for c in node["status"]["conditions"] if c["type"] == "Ready"]
    assert ready and ready[0]["status"] == "True"
    assert int(node["status"]["allocatable"]["pods"]) >= 500
    lease = k8s.api("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/local-node")
    first = lease["spec"]["renewTime"]
    eventually(
        lambda: (
            k8s.api("GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/local-node")["spec"][
                "renewTime"
            ]
            != first
        ),
        timeout=30,
        what="lease renewal",
    )


def test_indexed_job_completes_every_index(k8s, node_agent, namespace, tmp_path):
    code = (
        "import os, sys; i = os.environ['JOB_COMPLETION_INDEX']; "
        "open(os.path.join(sys.argv[1], i), 'w').write(i); print('wrote index', i)"
    )
    make_job(
        k8s,
        namespace,
        "indexed",
        py_container(code, str(tmp_path)),
        completions=5,
        parallelism=2,
        completionMode="Indexed",
        backoffLimit=0,
    )

    job = job_condition(k8s, namespace, "indexed", "Complete", "Failed")
    assert job["status"]["completedIndexes"] == "0-4"
    assert job["status"]["succeeded"] == 5
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {str(i): str(i) for i in range(5)}
    pods = k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    assert {p["status"]["phase"] for p in pods} == {"Succeeded"}
    some = pods[0]["metadata"]
    index = some["annotations"]["batch.kubernetes.io/job-completion-index"]
    assert f"wrote index {index}" in node_agent.pod_log_path(namespace, some["name"]).read_text()


def test_fail_index_rule_fails_only_that_index(k8s, node_agent, namespace):
    code = "import os, sys; sys.exit(3 if os.environ['JOB_COMPLETION_INDEX'] == '1' else 0)"
    make_job(
        k8s,
        namespace,
        "failindex",
        py_container(code),
        completions=3,
        parallelism=3,
        completionMode="Indexed",
        backoffLimitPerIndex=2,
        podFailurePolicy={"rules": [{"action": "FailIndex", "onExitCodes": {"operator": "In", "values": [3]}}]},
    )

    job = job_condition(k8s, namespace, "failindex", "Failed", "Complete")
    assert job["status"]["failedIndexes"] == "1"
    assert job["status"]["completedIndexes"] == "0,2"
    # FailIndex: no retry of index 1 although backoffLimitPerIndex allows two.
    pods = k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
    failed = [p for p in pods if p["status"]["phase"] == "Failed"]
    assert len(failed) == 1
    assert failed[0]["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 3


def test_termination_message_and_exit_code_reach_pod_status(k8s, node_agent, namespace):
    write_and_fail = (
        "import os, sys; open(os.environ['TERMINATION_MESSAGE_PATH'], 'w').write('stopped at chunk 17'); sys.exit(7)"
    )
    make_pod(k8s, namespace, "message", py_container(write_and_fail))
    make_pod(
        k8s,
        namespace,
        "fallback",
        py_container(
            "import sys; print('line one'); print('snowflake said no', file=sys.stderr); sys.exit(2)",
            terminationMessagePolicy="FallbackToLogsOnError",
        ),
    )
    # A worker that only knows the spec's terminationMessagePath still reaches the status.
    make_pod(
        k8s,
        namespace,
        "custom-path",
        {
            "name": "main",
            "image": "busybox",
            "terminationMessagePath": "/var/run/beam/done",
            "command": ["sh", "-c", "printf 'all good' > /var/run/beam/done"],
        },
    )

    message = finished_pod(k8s, namespace, "message")
    assert message["status"]["phase"] == "Failed"
    term = message["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (7, "Error", "stopped at chunk 17")

    fallback = finished_pod(k8s, namespace, "fallback")["status"]["containerStatuses"][0]["state"]["terminated"]
    assert fallback["exitCode"] == 2
    assert "line one" in fallback["message"] and "snowflake said no" in fallback["message"]

    custom = finished_pod(k8s, namespace, "custom-path")
    assert custom["status"]["phase"] == "Succeeded"
    term = custom["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (term["exitCode"], term["reason"], term["message"]) == (0, "Completed", "all good")
    assert not Path("/var/run/beam/done").exists()


def test_env_sources_resolve(k8s, node_agent, namespace, tmp_path):
    k8s.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}},
    )
    k8s.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/configmaps",
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"sink": "kafka"}},
    )
    out = tmp_path / "env.json"
    names = ["PASSWORD", "SINK", "POD_NAME", "POD_NAMESPACE", "POD_UID", "APP", "NOTE", "NODE", "POD_IP", "GREETING"]
    code = (
        "import json, os, sys; json.dump({k: os.environ.get(k) for k in sys.argv[2:]} | {'arg': sys.argv[1]}, open("
        + repr(str(out))
        + ", 'w'))"
    )
    field = lambda path: {"valueFrom": {"fieldRef": {"fieldPath": path}}}  # noqa: E731
    env = [
        {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
        {"name": "SINK", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "sink"}}},
        {"name": "POD_NAME", **field("metadata.name")},
        {"name": "POD_NAMESPACE", **field("metadata.namespace")},
        {"name": "POD_UID", **field("metadata.uid")},
        {"name": "APP", **field("metadata.labels['app']")},
        {"name": "NOTE", **field("metadata.annotations['note']")},
        {"name": "NODE", **field("spec.nodeName")},
        {"name": "POD_IP", **field("status.podIP")},
        {"name": "GREETING", "value": "$(NOTE) from $(POD_NAME)"},
    ]
    container = py_container(code, "$(SINK)-$(NODE)", *names, env=env)
    pod = make_pod(k8s, namespace, "envpod", container)

    assert finished_pod(k8s, namespace, "envpod")["status"]["phase"] == "Succeeded"
    assert json.loads(out.read_text()) == {
        "PASSWORD": "s3cret",
        "SINK": "kafka",
        "POD_NAME": "envpod",
        "POD_NAMESPACE": namespace,
        "POD_UID": pod["metadata"]["uid"],
        "APP": "agent-test",
        "NOTE": "hello",
        "NODE": "local-node",
        "POD_IP": "127.0.0.1",
        "GREETING": "hello from envpod",
        "arg": "kafka-local-node",
    }


def test_missing_secret_waits_and_unknown_image_is_reported(k8s, node_agent, namespace, tmp_path):
    marker = tmp_path / "ran"
    make_pod(
        k8s,
        namespace,
        "needs-secret",
        py_container(
            "import sys; open(sys.argv[1], 'w').write('ok')",
            str(marker),
            env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "late", "key": "token"}}}],
        ),
    )
    make_pod(k8s, namespace, "bad-image", {"name": "main", "image": "nginx:1.27"})

    def waiting(name):
        pod = get_pod(k8s, namespace, name)
        statuses = (pod or {}).get("status", {}).get("containerStatuses") or []
        return (
            statuses
            and statuses[0]["state"].get("waiting")
            and (pod["status"]["phase"], statuses[0]["state"]["waiting"])
        )

    phase, why = eventually(lambda: waiting("needs-secret"), what="CreateContainerConfigError")
    assert phase == "Pending" and why["reason"] == "CreateContainerConfigError"
    assert 'secret "late" not found' in why["message"]
    phase, why = eventually(lambda: waiting("bad-image"), what="ErrImagePull")
    assert phase == "Pending" and why["reason"] == "ErrImagePull" and "nginx:1.27" in why["message"]

    # As with a kubelet, the Pod starts once its Secret exists.
    k8s.api(
        "POST",
        f"/api/v1/namespaces/{namespace}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "late"}, "stringData": {"token": "t"}},
    )
    assert finished_pod(k8s, namespace, "needs-secret")["status"]["phase"] == "Succeeded"
    assert marker.read_text() == "ok"


SLEEPER = """
import os, signal, sys, time
record = sys.argv[1]
def on_term(signum, frame):
    open(record, 'a').write('TERM')
    sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
open(record + '.pid-' + os.environ.get('HOSTNAME', 'x'), 'w').write(str(os.getpid()))
time.sleep(600)
"""


def test_deleting_a_running_pod_sends_sigterm_and_removes_it(k8s, node_agent, namespace, tmp_path):
    record = tmp_path / "signal"
    make_pod(k8s, namespace, "sleeper", py_container(SLEEPER, str(record)))
    pid_file = tmp_path / "signal.pid-sleeper"
    eventually(pid_file.exists, what="sleeper started")
    pod = get_pod(k8s, namespace, "sleeper")
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"] == "127.0.0.1"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]["startedAt"]
    assert {c["type"] for c in pod["status"]["conditions"] if c["status"] == "True"} >= {"Ready", "ContainersReady"}

    k8s.api("DELETE", f"/api/v1/namespaces/{namespace}/pods/sleeper")
    eventually(lambda: get_pod(k8s, namespace, "sleeper") is None, what="pod object removed")
    assert record.read_text() == "TERM"
    assert process_gone(int(pid_file.read_text()))


@pytest.mark.parametrize("propagation", ["Foreground", "Background"])
def test_deleting_a_job_stops_its_pods(k8s, node_agent, namespace, tmp_path, propagation):
    record = tmp_path / "signal"
    make_job(k8s, namespace, "sleepers", py_container(SLEEPER, str(record)), completions=2, parallelism=2)
    eventually(lambda: len(list(tmp_path.glob("signal.pid-*"))) == 2, what="both pods started")
    pids = [int(p.read_text()) for p in tmp_path.glob("signal.pid-*")]

    k8s.api(
        "DELETE",
        f"/apis/batch/v1/namespaces/{namespace}/jobs/sleepers",
        {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": propagation},
    )

    def all_gone():
        pods = k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]
        try:
            k8s.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/sleepers")
            job_exists = True
        except ApiError as e:
            job_exists = e.status != 404
        return not pods and not job_exists

    eventually(all_gone, what="job and pods deleted")
    assert all(process_gone(pid) for pid in pids)
    assert record.read_text() == "TERM" * 2


def test_agent_stop_kills_pods_and_restart_fails_lost_ones(k8s, node_agent, namespace, tmp_path):
    # A second agent with its own node; Pods are bound to it by nodeName, so the session's agent
    # leaves them alone.
    run_dir = tmp_path / "agent"
    kubeconfig = k8s.endpoints()["kubeconfig"]
    agent = NodeAgent(run_dir, kubeconfig=kubeconfig, node_name="restart-node").start()
    try:
        record = tmp_path / "signal"
        make_pod(k8s, namespace, "orphan", py_container(SLEEPER, str(record)), nodeName="restart-node")
        pid_file = tmp_path / "signal.pid-orphan"
        eventually(pid_file.exists, what="pod started under the second agent")
        eventually(lambda: get_pod(k8s, namespace, "orphan")["status"].get("phase") == "Running", what="Running")
        agent.stop()
        assert process_gone(int(pid_file.read_text()))
        assert record.read_text() == "TERM"

        # The Pod is still Running in the API; the restarted agent has no process for it.
        assert get_pod(k8s, namespace, "orphan")["status"]["phase"] == "Running"
        agent = NodeAgent(run_dir, kubeconfig=kubeconfig, node_name="restart-node").start()
        pod = finished_pod(k8s, namespace, "orphan")
        assert (pod["status"]["phase"], pod["status"]["reason"]) == ("Failed", "NodeAgentRestarted")

        # SIGKILL leaves the agent no chance to clean up: PR_SET_PDEATHSIG must take its Pods.
        make_pod(k8s, namespace, "orphan2", py_container(SLEEPER, str(record)), nodeName="restart-node")
        pid_file = tmp_path / "signal.pid-orphan2"
        eventually(pid_file.exists, what="second pod started")
        agent.proc.popen.send_signal(signal.SIGKILL)
        agent.proc.popen.wait()
        eventually(lambda: process_gone(int(pid_file.read_text())), timeout=10, what="pod process died with the agent")
    finally:
        agent.stop()
        # No agent is left to remove Pods of restart-node: force them out of the namespace.
        for pod in k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods")["items"]:
            k8s.api(
                "DELETE",
                f"/api/v1/namespaces/{namespace}/pods/{pod['metadata']['name']}",
                {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0},
            )
        k8s.api("DELETE", "/api/v1/nodes/restart-node")


def test_active_deadline_and_on_failure_restart(k8s, node_agent, namespace, tmp_path):
    make_pod(k8s, namespace, "too-slow", py_container("import time; time.sleep(600)"), activeDeadlineSeconds=2)
    flaky = (
        "import os, sys; m = sys.argv[1]; first = not os.path.exists(m); open(m, 'a').write('x'); "
        "sys.exit(5 if first else 0)"
    )
    make_pod(k8s, namespace, "flaky", py_container(flaky, str(tmp_path / "tries")), restartPolicy="OnFailure")

    slow = finished_pod(k8s, namespace, "too-slow")["status"]
    assert (slow["phase"], slow["reason"]) == ("Failed", "DeadlineExceeded")

    status = finished_pod(k8s, namespace, "flaky")["status"]
    assert status["phase"] == "Succeeded"
    container = status["containerStatuses"][0]
    assert container["restartCount"] == 1
    assert container["lastState"]["terminated"]["exitCode"] == 5
    assert (tmp_path / "tries").read_text() == "xx"


def test_agent_rides_out_an_apiserver_restart(k8s, node_agent, namespace):
    # This Pod exits while the apiserver is down: its terminal status must still arrive.
    waiter = (
        "import socket, sys, time\n"
        "while socket.socket().connect_ex(('127.0.0.1', int(sys.argv[1]))) == 0: time.sleep(0.1)"
    )
    make_pod(k8s, namespace, "across", py_container(waiter, str(k8s.port)))
    eventually(
        lambda: (get_pod(k8s, namespace, "across") or {}).get("status", {}).get("phase") == "Running",
        what="pod running",
    )
    k8s.restart_apiserver(downtime=3)

    assert finished_pod(k8s, namespace, "across")["status"]["phase"] == "Succeeded"
    # ...and the watch resumed: a new Pod still runs.
    make_pod(k8s, namespace, "after", py_container("pass"))
    assert finished_pod(k8s, namespace, "after")["status"]["phase"] == "Succeeded"


@pytest.mark.slow
def test_fifty_trivial_completions(k8s, node_agent, namespace):
    started = time.monotonic()
    make_job(
        k8s,
        namespace,
        "fifty",
        py_container("pass"),
        completions=50,
        parallelism=10,
        completionMode="Indexed",
        backoffLimit=0,
    )
    job = job_condition(
        k8s,
        namespace,
        "fifty",
        "Complete",
        "Failed",
    )
    elapsed = time.monotonic() - started
    assert job["status"]["completedIndexes"] == "0-49"
    print(f"\n50 pods (parallelism 10) in {elapsed:.1f}s: {50 / elapsed:.1f} pods/s", file=sys.stderr)
