"""A standby operator: two replicas of the chart's Deployment, one active behind the Lease; the
active one is killed mid-transport and the standby finishes the backfill (issue 16)."""

from __future__ import annotations

import time
from collections import Counter

from e2e_helpers import API, WINDOW, apply, assert_exactly, backfill, expected_ids, jobs, read_topic, wait_status

from beam_devstack.substrate.kafka_proxy import END_TXN
from beam_devstack.substrate.proc import wait_for

NS, DEPLOYMENT = "beam-system", "beam-beam-backfill"
LEASE = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases/{DEPLOYMENT}"
SEL = "app.kubernetes.io%2Fcomponent%3Doperator"


def _operator_pods(k8s) -> list[dict]:
    pods = k8s.api("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector={SEL}")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def _running(k8s) -> set[str]:
    return {
        p["metadata"]["name"]
        for p in _operator_pods(k8s)
        if all(cs.get("ready") for cs in p["status"].get("containerStatuses") or [{}])
    }


def _holder(k8s) -> str | None:
    return (k8s.api("GET", LEASE).get("spec") or {}).get("holderIdentity")


def _scale(k8s, n: int) -> None:
    k8s.kubectl("-n", NS, "scale", f"deployment/{DEPLOYMENT}", f"--replicas={n}")

    def settled() -> bool:
        # Terminating Pods too: a later test reading the operators' logs must not find one gone.
        every = k8s.api("GET", f"/api/v1/namespaces/{NS}/pods?labelSelector={SEL}")["items"]
        return len(every) == n and len(_running(k8s)) == n

    wait_for(settled, 180, f"{n} operator Pods ready and no other")
    wait_for(lambda: _holder(k8s) in _running(k8s), 60, "one of them holding the lease")


def _two_replicas(k8s) -> tuple[str, str]:
    """Scale to two and wait for the standby to stand by: (active, standby) Pod names."""
    _scale(k8s, 2)
    active = _holder(k8s)
    [standby] = _running(k8s) - {active}
    waiting = "standing by: lease beam-system/beam-beam-backfill is held by " + active
    wait_for(lambda: waiting in k8s.kubectl("logs", "-n", NS, standby).stdout, 60, "the standby standing by")
    return active, standby


def test_a_standby_takes_over_from_a_frozen_active_operator_which_then_steps_down(
    k8s, node_cluster, operator, kafka, seeded, org
):
    # The active replica is frozen (containerd pauses its process: a stalled VM, a stop-the-world
    # pause) while a worker is held inside its transaction: it neither renews nor releases the
    # Lease. The standby must take over once the Lease expires, and the frozen one, when it runs
    # again, must step down before it writes anything.
    node = node_cluster[1]
    try:
        active, standby = _two_replicas(k8s)
        [cs] = k8s.api("GET", f"/api/v1/namespaces/{NS}/pods/{active}")["status"]["containerStatuses"]
        container, restarts = cs["containerID"].removeprefix("containerd://"), cs["restartCount"]
        uid = apply(k8s, org, backfill("failover", "e2e-failover", parallelism=1))["metadata"]["uid"]
        with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
            assert kafka.proxy.wait_held(1, timeout=180), "the transport worker never reached its commit"
            node.ctr("tasks", "pause", container)
            frozen = time.monotonic()
            wait_for(lambda: _holder(k8s) == standby, 60, "the standby holding the lease")
            took = time.monotonic() - frozen
            node.ctr("tasks", "resume", container)

            def stepped_down():
                [now] = k8s.api("GET", f"/api/v1/namespaces/{NS}/pods/{active}")["status"]["containerStatuses"]
                return now["restartCount"] > restarts

            wait_for(stepped_down, 60, "the resumed operator stepping down")
        previous = k8s.kubectl("logs", "-n", NS, active, "--previous").stdout
        assert "exiting so that only one operator acts" in previous, previous[-2000:]
        print(f"the standby took over {took:.1f}s after the active operator froze")  # docs/operations.md
        st = wait_status(k8s, org, "failover", "completed")
        assert st["chunks_left"] == 0
        assert _holder(k8s) == standby  # the restarted one stands by now
    finally:
        _scale(k8s, 1)
    transport = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert len(transport) == 1, [j["metadata"]["name"] for j in transport]
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-failover"), expected_ids(seeded))
    events = k8s.api("GET", f"/api/v1/namespaces/{org}/events?fieldSelector=involvedObject.uid%3D{uid}")["items"]
    reasons = Counter(e["reason"] for e in events for _ in range(e.get("count") or 1))
    assert reasons["Transporting"] == 1 and reasons["Completed"] == 1, reasons  # no duplicate Event storm
    assert k8s.api("GET", API.format(ns=org, name="failover"))["status"]["status"] == "completed"


def _restarts(k8s) -> dict[str, int]:
    return {
        p["metadata"]["name"]: sum(cs["restartCount"] for cs in p["status"].get("containerStatuses") or [])
        for p in _operator_pods(k8s)
    }


def test_an_apiserver_down_for_20s_leaves_a_standby_standing_by_and_one_leader_after(
    k8s, node_cluster, operator, kafka, seeded, org
):
    # A refused connection used to end the renewal thread and a standby's wait (urllib3's
    # MaxRetryError is not an ApiException): the standby crash-looped.
    plane = node_cluster[0]
    try:
        active, standby = _two_replicas(k8s)
        before = _restarts(k8s)
        plane.restart_apiserver(downtime=20)
        wait_for(lambda: len(_running(k8s)) == 2 and _holder(k8s) in _running(k8s), 120, "two Ready, one leading")
        after = _restarts(k8s)
        assert after[standby] == before[standby], "the standby kept standing by through the outage"
        # The leader could not prove its lease for longer than it lasts: it stepped down (exit,
        # restarted by the kubelet) rather than act beside a standby that may have taken over.
        assert after[active] <= before[active] + 1, (before, after)
        logs = k8s.kubectl("logs", "-n", NS, standby).stdout
        assert "cannot reach lease beam-system/beam-beam-backfill" in logs, logs[-2000:]
        # The one leading afterwards runs backfills.
        window = {**WINDOW, "end": "2026-03-02T00:00:00"}
        apply(k8s, org, backfill("after-outage", "e2e-after-outage", window=window))
        wait_status(k8s, org, "after-outage", "completed")
        assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-after-outage"), expected_ids(seeded, window))
    finally:
        _scale(k8s, 1)
