"""The product on a real node: real containers from the images the Dockerfiles build, the
operator installed by `helm install` and running as the chart's Pod, workers as the Jobs it
creates, and what a user types (`kubectl logs`, `kubectl describe pod`) answering."""

from __future__ import annotations

import time
import urllib.parse

from beam_devstack import dataset
from beam_devstack.images import JOBRUNNER, OPERATOR

WINDOW = {"partition_key": "block_timestamp", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}


def wait_for(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what} not within {timeout:.0f}s")


def test_the_node_runs_containerd_and_the_operator_runs_as_the_charts_pod(cluster, installed):
    plane, _ = cluster
    node = plane.api("GET", "/api/v1/nodes")["items"][0]
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")
    assert {c["type"]: c["status"] for c in node["status"]["conditions"]}["Ready"] == "True"
    pods = plane.api(
        "GET", "/api/v1/namespaces/beam-system/pods?labelSelector=app.kubernetes.io%2Fcomponent%3Doperator"
    )
    [pod] = pods["items"]
    assert pod["status"]["phase"] == "Running"
    [status] = pod["status"]["containerStatuses"]
    # Ready means the chart's readiness probe answered on kopf's /healthz inside the container.
    assert status["ready"] is True and status["restartCount"] == 0
    assert pod["spec"]["containers"][0]["image"] == f"{OPERATOR.repository}:{OPERATOR.tag()}"
    ctx = pod["spec"]["containers"][0]["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["runAsNonRoot"] is True


def test_seed_backfill_completes_in_real_containers_with_exactly_the_window(installed, servers, org):
    plane = installed
    kafka = servers["kafka"]
    topic = "node-usdc"
    spec = {
        "job_name": "USDC on Base, March 2026, on a real node",
        "table": dataset.TABLE,
        "backfill_window": WINDOW,
        "filter": {"column": "token_address", "values": [dataset.USDC]},
        "destinations": [{"type": "kafka", "name": topic}],
        "parallelism": 2,
    }
    body = {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": "usdc"},
        "spec": spec,
    }
    obj = plane.api("POST", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills", body)
    uid = obj["metadata"]["uid"]

    def ended():
        st = (
            plane.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills/usdc").get("status")
            or {}
        )
        return st if st.get("status") in ("completed", "failed", "cancelled") else None

    try:
        st = wait_for(ended, 240, "the backfill's end")
    except AssertionError:
        raise AssertionError(story(plane, org)) from None
    assert st["status"] == "completed", story(plane, org)
    assert st["num_chunks"] >= 2 and st["chunks_left"] == 0

    want = expected_ids(servers["snowflake"])
    got = read_keys(kafka.bootstrap, topic)
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


def test_a_pod_whose_image_is_missing_shows_the_real_reason(installed, org):
    plane = installed
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
    described = plane.kubectl("describe", "pod", "-n", org, "no-image").stdout
    assert "ErrImageNeverPull" in described and "not present with pull policy of Never" in described, described


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
    cur = snowflake.connect("base", "assets").cursor()
    cur.execute(
        f"SELECT unique_id FROM {dataset.TABLE} WHERE block_timestamp >= CAST(? AS TIMESTAMP_NTZ) "
        "AND block_timestamp < CAST(? AS TIMESTAMP_NTZ) AND token_address IN (?)",
        [WINDOW["start"], WINDOW["end"], dataset.USDC],
    )
    return {r[0] for r in cur.fetchall()}


def read_keys(bootstrap: str, topic: str) -> list[str]:
    """Every committed key of a one-partition topic, read to its end."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "node-test",
            "isolation.level": "read_committed",
            "enable.partition.eof": True,
            "enable.auto.commit": False,
        }
    )
    c.assign([TopicPartition(topic, 0, 0)])
    out = []
    try:
        while True:
            m = c.poll(30)
            assert m is not None, f"no end of {topic} within 30s"
            if m.error():
                if m.error().code() == KafkaError._PARTITION_EOF:
                    return out
                raise AssertionError(m.error())
            out.append(m.key().decode())
    finally:
        c.close()
