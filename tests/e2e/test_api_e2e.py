"""The REST API as users reach it: the chart's API Deployment behind its Service, with keys an
administrator makes with `beam-api keys create`, next to kubectl at every step of real backfills
(the chart's operator, the jobrunner image, real data)."""

from __future__ import annotations

import json
import time

import httpx
from e2e_helpers import WINDOW, backfill

from beam_devstack import dataset
from beam_devstack.substrate.kafka_proxy import END_TXN


def client(api_url, key):
    return httpx.Client(base_url=api_url, headers={"X-API-Key": key}, timeout=30)


def kubectl_backfill(k8s, ns, uid):
    items = json.loads(k8s.kubectl("get", "beambackfills", "-n", ns, "-o", "json").stdout)["items"]
    return next(o for o in items if o["metadata"]["uid"] == uid)


def as_kubectl_shows_it(obj):
    st = obj.get("status") or {}
    return {
        "status": st.get("status") or "staging",
        "num_chunks": st.get("num_chunks"),
        "chunks_left": st.get("chunks_left"),
        "error_message": st.get("error_message"),
        "time_created": st.get("time_created") or obj["metadata"]["creationTimestamp"],
        "time_completed": st.get("time_completed"),
    }


def follow(k8s, c, ns, uid, until, timeout=180):
    """Sample the API and kubectl until `until(state)`; compare them whenever the resource did
    not change between the two kubectl reads around the API read. Returns the states compared."""
    compared = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = kubectl_backfill(k8s, ns, uid)
        [job] = [j for j in c.get("/backfills").json() if j["job_id"] == uid]
        after = kubectl_backfill(k8s, ns, uid)
        if before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]:
            expected = as_kubectl_shows_it(after)
            assert {k: job[k] for k in expected} == expected
            if not compared or compared[-1] != expected:
                compared.append(expected)
            if until(expected):
                return compared
    raise AssertionError(f"timed out; compared so far: {compared}")


def body(name: str, **spec) -> dict:
    return {**backfill(name, f"api-{name}")["spec"], "job_name": f"api {name}", **spec}


def test_api_and_kubectl_agree_while_chunks_left_counts_down(k8s, operator, kafka, api_url, key, org):
    # Two chunks commit, then the stack's Kafka proxy holds the workers' next commits: the
    # countdown stands still mid-way until both sides have been seen to agree on it.
    with client(api_url, key) as c:
        r = c.post("/backfills", json=body("agree", parallelism=2))
        assert r.status_code == 200, r.text
        uid = r.json()["job_id"]
    with kafka.proxy.holding(END_TXN, after=2, transactional_id=f"beam-{uid}-"), client(api_url, key) as c:
        states = follow(
            k8s, c, org, uid, lambda s: s["status"] == "transporting" and 0 < s["chunks_left"] < s["num_chunks"]
        )
    with client(api_url, key) as c:
        states += follow(k8s, c, org, uid, lambda s: s["status"] in {"completed", "failed"})
    statuses = [s["status"] for s in states]
    assert statuses[0] == "staging" and statuses[-1] == "completed", states
    assert "transporting" in statuses
    total = states[-1]["num_chunks"]
    assert total >= 4, states  # the dataset makes several 1 MiB chunks in March
    left = [s["chunks_left"] for s in states if s["status"] == "transporting"]
    assert any(0 < n < total for n in left), states  # progress was seen in both, not only the ends
    assert states[-1]["chunks_left"] == 0 and states[-1]["time_completed"].endswith("Z")


def test_cancel_through_the_api_is_what_kubectl_shows(k8s, operator, kafka, api_url, key, org):
    # The worker's commit is held by the stack's Kafka proxy: the backfill is observably
    # transporting, not racing to completion, when the cancel arrives.
    with client(api_url, key) as c:
        uid = c.post("/backfills", json=body("cancel-me", parallelism=1)).json()["job_id"]
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"), client(api_url, key) as c:
        assert kafka.proxy.wait_held(1, timeout=180), "the transport worker never reached its commit"
        follow(k8s, c, org, uid, lambda s: s["status"] == "transporting")
        r = c.post(f"/backfills/{uid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "transporting", r.text
        states = follow(k8s, c, org, uid, lambda s: s["status"] == "cancelled", timeout=60)
        assert states[-1]["time_completed"] is not None
        again = c.post(f"/backfills/{uid}/cancel")
        assert again.status_code == 409 and "cancelled" in again.json()["detail"]


def test_a_failed_backfill_reports_the_same_error_in_both(k8s, operator, api_url, key, org):
    missing = dataset.TABLE + "_v9"  # allowed by the operator's config, absent from the warehouse
    with client(api_url, key) as c:
        uid = c.post("/backfills", json=body("fails", table=missing, backfill_window=WINDOW)).json()["job_id"]
        states = follow(k8s, c, org, uid, lambda s: s["status"] == "failed")
    assert (
        states[-1]["error_message"] == f"staging failed: staging: table {missing} does not exist or is not authorized"
    )
