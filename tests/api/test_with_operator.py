"""The API and kubectl agree at every step of real backfills run by the real operator (with the
stand-in worker, tests/standin/bin/beam-jobrunner), including a cancel through the API."""

from __future__ import annotations

import json
import time

import pytest

from beam_devstack.operator_proc import OperatorProcess


@pytest.fixture(scope="module")
def operator(k8s, chart_identities, node_agent, gcs, tmp_path_factory):
    op = OperatorProcess(
        tmp_path_factory.mktemp("operator"),
        kubeconfig=chart_identities["operator"],
        config={
            "BEAM_JOBRUNNER_IMAGE": "beam-backfill/standin-jobrunner:test",
            "BEAM_GCS_ENDPOINT": gcs.endpoints()["url"],
            "BEAM_STAGING_BUCKET": "beam-staging",
        },
    ).start()
    yield op
    op.stop()


def kubectl_job(k8s, ns, uid):
    items = json.loads(k8s.kubectl("get", "beambackfills", "-n", ns, "-o", "json").stdout)["items"]
    return next(o for o in items if o["metadata"]["uid"] == uid)


def as_user_sees_it_in_kubectl(obj):
    st = obj.get("status") or {}
    return {
        "status": st.get("status") or "staging",
        "num_chunks": st.get("num_chunks"),
        "chunks_left": st.get("chunks_left"),
        "error_message": st.get("error_message"),
        "time_created": st.get("time_created") or obj["metadata"]["creationTimestamp"],
        "time_completed": st.get("time_completed"),
    }


def follow(k8s, client, ns, uid, until, timeout=120, on_sample=None):
    """Sample API and kubectl until `until(state)`; compare whenever the resource did not change
    between the two kubectl reads around the API read. Returns the compared states."""
    compared = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        before = kubectl_job(k8s, ns, uid)
        [job] = [j for j in client.get("/backfills").json() if j["job_id"] == uid]
        after = kubectl_job(k8s, ns, uid)
        if before["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]:
            expected = as_user_sees_it_in_kubectl(after)
            assert {k: job[k] for k in expected} == expected
            if not compared or compared[-1] != expected:
                compared.append(expected)
            if on_sample:
                on_sample(expected)
            if until(expected):
                return compared
    raise AssertionError(f"timed out; compared so far: {compared}")


def test_api_and_kubectl_agree_through_a_backfill(k8s, operator, api, org):
    ns, key = org
    body = {
        "job_name": "agree stage-sleep=1 sleep=1.5",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {"partition_key": "block", "start": 0, "end": 6},
        "destinations": [{"type": "kafka", "name": "agree"}],
        "parallelism": 2,
    }
    with api.client(key) as c:
        uid = c.post("/backfills", json=body).json()["job_id"]
        states = follow(k8s, c, ns, uid, lambda s: s["status"] == "completed")
    statuses = [s["status"] for s in states]
    assert statuses[0] == "staging" and statuses[-1] == "completed"
    assert "transporting" in statuses
    left = [s["chunks_left"] for s in states if s["status"] == "transporting"]
    assert any(0 < n < 6 for n in left), states  # progress was seen in both, not only the ends
    assert states[-1]["num_chunks"] == 6 and states[-1]["chunks_left"] == 0
    assert states[-1]["time_completed"].endswith("Z")


def test_cancel_through_the_api_is_what_kubectl_shows(k8s, operator, api, org):
    ns, key = org
    body = {
        "job_name": "cancel-me sleep=30",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {"partition_key": "block", "start": 0, "end": 4},
        "destinations": [{"type": "kafka", "name": "cancel-me"}],
    }
    with api.client(key) as c:
        uid = c.post("/backfills", json=body).json()["job_id"]
        follow(k8s, c, ns, uid, lambda s: s["status"] == "transporting")
        r = c.post(f"/backfills/{uid}/cancel")
        assert r.status_code == 200 and r.json()["status"] == "transporting"
        states = follow(k8s, c, ns, uid, lambda s: s["status"] == "cancelled", timeout=60)
        assert states[-1]["time_completed"] is not None
        again = c.post(f"/backfills/{uid}/cancel")
        assert again.status_code == 409 and "cancelled" in again.json()["detail"]


def test_a_failed_backfill_reports_the_same_error_in_both(k8s, operator, api, org):
    ns, key = org
    body = {
        "job_name": "fails fail-chunk=1",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {"partition_key": "block", "start": 0, "end": 3},
        "destinations": [{"type": "kafka", "name": "fails"}],
    }
    with api.client(key) as c:
        uid = c.post("/backfills", json=body).json()["job_id"]
        states = follow(k8s, c, ns, uid, lambda s: s["status"] == "failed")
    assert "chunk 1" in states[-1]["error_message"]
