"""The product on a real node: real containers from the images the Dockerfiles build, the
operator node_operator by `helm install` and running as the chart's Pod, workers as the Jobs it
creates, and what a user types (`kubectl logs`, `kubectl describe pod`) answering."""

from __future__ import annotations

import urllib.parse

from beam_devstack import dataset
from beam_devstack.images import JOBRUNNER, OPERATOR, jobrunner_job
from beam_devstack.substrate.kafka import consume_all
from beam_devstack.substrate.kafka_proxy import END_TXN
from beam_devstack.substrate.proc import wait_for

WINDOW = {"partition_key": "block_timestamp", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}


def test_the_node_runs_containerd_and_the_operator_runs_as_the_charts_pod(node_cluster, node_operator):
    plane, _ = node_cluster
    node = plane.api("GET", "/api/v1/nodes")["items"][0]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    pods = plane.api(
        "GET", "/api/v1/namespaces/beam-system/pods?labelSelector=app.kubernetes.io%2Fcomponent%3Doperator"
    )
    [pod] = pods["items"]
    assert pod["status"]["phase"] == "Running"
    [status] = pod["status"]["containerStatuses"]
    # Ready means the chart's probe answered on kopf's /healthz inside the container. (Not
    # restartCount 0: tests/e2e kills this container and the kubelet restarts it.)
    assert status["ready"] is True
    assert pod["spec"]["containers"][0]["image"] == f"{OPERATOR.repository}:{OPERATOR.tag()}"
    ctx = pod["spec"]["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["runAsNonRoot"] is True


def test_seed_backfill_completes_in_real_containers_with_exactly_the_window(node_operator, node_servers, org):
    plane = node_operator
    kafka = node_servers["kafka"]
    topic = "node-usdc"
    obj = plane.api(
        "POST",
        f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills",
        backfill("usdc", topic, parallelism=2),
    )
    uid = obj["metadata"]["uid"]

    try:
        st = wait_for(lambda: ended(plane, org, "usdc"), 240, "the backfill's end")
    except AssertionError:
        raise AssertionError(story(plane, org)) from None
    assert st["status"] == "completed", story(plane, org)
    assert st["num_chunks"] >= 2 and st["chunks_left"] == 0

    want = expected_ids(node_servers["snowflake"])
    got = read_keys(kafka.bootstrap, f"{org}.{topic}")  # the managed Kafka: <namespace>.<name>
    assert len(got) == len(set(got)), "duplicates"
    assert set(got) == want

    # What a user types when something looks wrong: the workers' logs and their Pods' story.
    sel = urllib.parse.quote(f"beam-backfill.dev/job-id={uid}")
    pods = plane.api("GET", f"/api/v1/namespaces/{org}/pods?labelSelector={sel}")["items"]
    transport = [p for p in pods if p["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert transport and all(p["status"]["phase"] == "Succeeded" for p in transport)
    logs = plane.kubectl("logs", "-n", org, transport[0]["metadata"]["name"]).stdout
    assert "delivered" in logs and "rows" in logs, logs
    staging = next(p for p in pods if p["metadata"]["labels"]["beam-backfill.dev/phase"] == "staging")
    described = plane.kubectl("describe", "pod", "-n", org, staging["metadata"]["name"]).stdout
    assert JOBRUNNER.tag() in described and "Completed" in described, described


def test_a_killed_container_and_a_deleted_pod_are_retried_without_loss_or_duplicates(
    node_cluster, node_operator, node_servers, org
):
    """Faults as a cluster injects them, at an observable point: both transport workers are held
    at their commit by the stack's Kafka proxy, inside their open transactions; then one
    container's process is SIGKILLed through containerd and the other Pod is deleted."""
    plane, node = node_cluster
    kafka = node_servers["kafka"]
    topic = "node-faults"
    obj = plane.api(
        "POST",
        f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills",
        backfill("faults", topic, parallelism=2),
    )
    uid = obj["metadata"]["uid"]
    # Held from right after the create (the first commit is seconds of staging away), and only
    # this backfill's commits: a worker an earlier test left behind commits undisturbed.
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(2, timeout=180), story(plane, org)
        # The kubelet may report the containers' start after they reached the proxy.
        try:
            running = wait_for(lambda: running_containers(transport_pods(plane, org, uid), 2), 60, "both running")
        except AssertionError:
            raise AssertionError(story(plane, org)) from None
        killed, deleted = running
        container = killed["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
        node.ctr("tasks", "kill", "--signal", "SIGKILL", container)
        plane.kubectl("delete", "pod", "-n", org, deleted["metadata"]["name"], "--wait=false")
        # Both workers are gone before the hold ends; their retries are created only after that
        # and need seconds to reach a commit of their own.
        wait_for(
            lambda: pod_phase(plane, org, killed) == "Failed" and pod_phase(plane, org, deleted) in ("Failed", None),
            60,
            "the end of both workers",
        )

    st = wait_for(lambda: ended(plane, org, "faults"), 240, "the backfill's end")
    assert st["status"] == "completed", story(plane, org)
    [term] = [p for p in transport_pods(plane, org, uid) if p["metadata"]["name"] == killed["metadata"]["name"]]
    assert term["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 137
    got = read_keys(kafka.bootstrap, f"{org}.{topic}")  # the managed Kafka: <namespace>.<name>
    assert len(got) == len(set(got)), "duplicates after the faults"
    assert set(got) == expected_ids(node_servers["snowflake"])


def test_an_evicted_worker_and_an_apiserver_restart_mid_transport_lose_nothing(
    node_cluster, node_operator, node_servers, org
):
    """An eviction (the Eviction API, as a node drain sends it) of the transport worker held at
    its commit, then a kube-apiserver restart once a later chunk is delivered: the evicted index
    is retried without counting as a failure, and every row arrives exactly once."""
    plane, _ = node_cluster
    kafka = node_servers["kafka"]
    topic = "node-evict"
    name = "evicted"
    obj = plane.api(
        "POST",
        f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills",
        backfill(name, topic, parallelism=1),
    )
    uid = obj["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), story(plane, org)
        [pod] = wait_for(lambda: running_containers(transport_pods(plane, org, uid), 1), 60, "the worker running")
        pod_name = pod["metadata"]["name"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod_name, "namespace": org}}
        plane.api("POST", f"/api/v1/namespaces/{org}/pods/{pod_name}/eviction", eviction)
        wait_for(lambda: pod_phase(plane, org, pod) in ("Failed", None), 60, "the evicted worker's end")

    def delivered_one_more():
        path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills/{name}"
        st = plane.api("GET", path).get("status") or {}
        return st.get("num_chunks") and st["chunks_left"] <= st["num_chunks"] - 2

    wait_for(delivered_one_more, 180, "two chunks delivered after the eviction")
    plane.restart_apiserver()
    st = wait_for(lambda: ended(plane, org, name), 240, "the backfill's end")
    assert st["status"] == "completed", story(plane, org)
    [job] = plane.api(
        "GET", f"/apis/batch/v1/namespaces/{org}/jobs?labelSelector=beam-backfill.dev%2Fphase%3Dtransport"
    )["items"]
    # The Job's podFailurePolicy ignores a DisruptionTarget: the eviction did not count as a failure.
    assert not job["status"].get("failed") and not job["status"].get("failedIndexes"), job["status"]
    got = read_keys(kafka.bootstrap, f"{org}.{topic}")  # the managed Kafka: <namespace>.<name>
    assert len(got) == len(set(got)), "duplicates after the eviction"
    assert set(got) == expected_ids(node_servers["snowflake"])


def test_a_finished_job_expires_after_its_ttl(node_operator, org):
    """The TTL-after-finished controller deletes a Job the real kubelet ran to completion (the
    operator's Jobs rely on it: config.job_ttl_seconds)."""
    plane = node_operator
    job = jobrunner_job("short-lived", ["true"], ttlSecondsAfterFinished=0)
    plane.api("POST", f"/apis/batch/v1/namespaces/{org}/jobs", job)

    def gone() -> bool:
        items = plane.api("GET", f"/apis/batch/v1/namespaces/{org}/jobs?fieldSelector=metadata.name%3Dshort-lived")
        return not items["items"]

    wait_for(gone, 120, "the finished Job deleted by the TTL-after-finished controller")
    events = plane.kubectl("get", "events", "-n", org, "-o", "json").stdout
    assert '"reason": "Completed"' in events, "the Job ran to completion before it was deleted"


def test_a_pod_whose_image_is_missing_shows_the_real_reason(node_operator, org):
    plane = node_operator
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "no-image"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{"name": "c", "image": "beam-backfill/not-built:1", "imagePullPolicy": "Never"}],
        },
    }
    plane.api("POST", f"/api/v1/namespaces/{org}/pods", pod)

    def waiting():
        st = plane.api("GET", f"/api/v1/namespaces/{org}/pods/no-image").get("status") or {}
        for cs in st.get("containerStatuses") or []:
            reason = (cs.get("state") or {}).get("waiting", {}).get("reason")
            if reason and reason != "ContainerCreating":
                return reason
        return None

    assert wait_for(waiting, 60, "a waiting reason") == "ErrImageNeverPull"

    # The kubelet sets the waiting reason first and posts its Event (the message) after it.
    def described_with_the_message():
        text = plane.kubectl("describe", "pod", "-n", org, "no-image").stdout
        return text if "not present with pull policy of Never" in text else None

    described = wait_for(described_with_the_message, 60, "the kubelet's Event in kubectl describe")
    assert "ErrImageNeverPull" in described and "not present with pull policy of Never" in described, described
    # What the operator makes of that Pod (the kubelet's own status): stuck, with the remedy.
    from dataclasses import replace
    from datetime import timedelta

    from beam_contract.model import BackfillStatus, parse_timestamp
    from beam_operator.config import OperatorConfig
    from beam_operator.kubeclient import waiting_of
    from beam_operator.reconcile import Observed, stuck_pods

    live = plane.api("GET", f"/api/v1/namespaces/{org}/pods/no-image")
    seen = waiting_of("a-job", live)
    assert seen is not None and seen.reason == "ErrImageNeverPull" and seen.pod == "no-image"
    later = parse_timestamp(live["metadata"]["creationTimestamp"]) + timedelta(seconds=301)
    obs = Observed("b", org, "uid", 1, "", {}, BackfillStatus(), now=later)
    why = stuck_pods(replace(obs, waiting=(seen,)), OperatorConfig())
    assert why.startswith("Pod no-image has been waiting 301s: ErrImageNeverPull: ") and "load the image" in why, why


def backfill(name: str, topic: str, **extra) -> dict:
    spec = {
        "job_name": f"USDC on Base, March 2026 ({name})",
        "table": dataset.TABLE,
        "backfill_window": WINDOW,
        "filter": {"column": "token_address", "values": [dataset.USDC]},
        "destinations": [{"type": "kafka", "name": topic}],
        **extra,
    }
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": name},
        "spec": spec,
    }


def ended(plane, namespace: str, name: str) -> dict | None:
    path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/{name}"
    st = plane.api("GET", path).get("status") or {}
    return st if st.get("status") in ("completed", "failed", "cancelled") else None


def transport_pods(plane, namespace: str, uid: str) -> list[dict]:
    sel = urllib.parse.quote(f"beam-backfill.dev/job-id={uid},beam-backfill.dev/phase=transport")
    return plane.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={sel}")["items"]


def running_containers(pods: list[dict], n: int) -> list[dict] | None:
    """The Pods whose container the kubelet reports running, once there are n of them."""
    running = [
        p
        for p in pods
        if any("running" in (cs.get("state") or {}) for cs in p["status"].get("containerStatuses") or [])
    ]
    return running if len(running) == n else None


def pod_phase(plane, namespace: str, pod: dict) -> str | None:
    """The Pod's phase; None once it is deleted."""
    items = plane.api(
        "GET", f"/api/v1/namespaces/{namespace}/pods?fieldSelector=metadata.name%3D{pod['metadata']['name']}"
    )
    return items["items"][0]["status"]["phase"] if items["items"] else None


def story(plane, namespace: str) -> str:
    """What a user would look at: the resource, its Pods, their logs, the operator's log."""
    out = [plane.kubectl("get", "bbf,jobs,pods", "-n", namespace, "-o", "wide", check=False).stdout]
    out.append(plane.kubectl("get", "bbf", "-n", namespace, "-o", "yaml", check=False).stdout[-3000:])
    for name in plane.kubectl("get", "pods", "-n", namespace, "-o", "name", check=False).stdout.split():
        out.append(plane.kubectl("describe", "-n", namespace, name, check=False).stdout[-2500:])
        out.append(plane.kubectl("logs", "-n", namespace, name, "--tail=30", check=False).stdout)
    out.append(plane.kubectl("logs", "-n", "beam-system", "deploy/beam-beam-backfill", "--tail=40", check=False).stdout)
    return "\n".join(out)


def expected_ids(snowflake) -> set[str]:
    return dataset.expected_ids(snowflake.connect("base", "assets"), WINDOW)


def read_keys(bootstrap: str, topic: str) -> list[str]:
    """Every committed key of the topic, read to its end."""
    return [m.key().decode() for m in consume_all(bootstrap, topic)]
