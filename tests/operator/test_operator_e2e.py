"""The real operator process, under the chart's RBAC, on the local control plane.

The jobrunner image is the stand-in worker (tests/standin/bin/beam-jobrunner), run by the node
agent as host processes, so these tests prove the operator's wiring: Jobs created with the right
shape, progress followed, failures and cancels reported, restarts absorbed.
"""

from __future__ import annotations

import json

from op_helpers import get_bbf, jobs_of, wait_for, wait_status


def backfill(name, job_name="seed", start=0, end=4, table="base.assets.erc20_token_transfers", **spec):
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": name},
        "spec": {
            "job_name": job_name,
            "table": table,
            "backfill_window": {"partition_key": "block", "start": start, "end": end},
            "destinations": [{"type": "kafka", "name": "base-usdc-transfers-backfill"}],
            **spec,
        },
    }


def apply(k8s, ns, obj):
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    return get_bbf(k8s, ns, obj["metadata"]["name"])


def events(k8s, ns, name):
    items = k8s.api("GET", f"/api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name%3D{name}")["items"]
    return [e["reason"] for e in sorted(items, key=lambda e: e["metadata"]["creationTimestamp"])]


def test_backfill_goes_staging_transporting_completed(k8s, operator, namespace):
    obj = apply(k8s, namespace, backfill("seed", start=0, end=5, parallelism=2))
    uid = obj["metadata"]["uid"]
    st = wait_status(k8s, namespace, "seed", "completed", timeout=90)
    assert st["job_id"] == uid
    assert st["workflow_id"] == f"beam-backfill-{namespace}-{uid}"
    assert (st["num_chunks"], st["chunks_left"], st["num_rows"]) == (5, 0, 500)
    assert st["time_completed"].endswith("Z") and st["time_created"].endswith("Z")
    assert "error_message" not in st
    conds = {c["type"]: c["status"] for c in st["conditions"]}
    assert conds == {"Complete": "True", "Failed": "False", "Staged": "True"}
    assert st["observedGeneration"] == 1
    [stage] = jobs_of(k8s, namespace, uid, "staging")
    [xport] = jobs_of(k8s, namespace, uid, "transport")
    assert xport["spec"]["completions"] == 5 and xport["spec"]["parallelism"] == 2
    assert xport["status"]["completedIndexes"] == "0-4"
    assert xport["spec"]["ttlSecondsAfterFinished"] == 600
    assert xport["metadata"]["ownerReferences"][0]["uid"] == uid
    # Event timestamps have 1 s resolution, so two transitions in one second may list in
    # either order: compare the set, and that each transition was recorded exactly once.
    wait_for(lambda: sorted(events(k8s, namespace, "seed")) == ["Completed", "Staging", "Transporting"], 10, "events")
    out = k8s.kubectl("get", "beambackfills", "-n", namespace).stdout
    assert out.split("\n")[0].split() == ["NAME", "STATUS", "CHUNKS", "LEFT", "TABLE", "AGE"]
    assert out.split("\n")[1].split()[:5] == ["seed", "completed", "5", "0", "base.assets.erc20_token_transfers"]


def test_chunks_left_counts_down_while_transporting(k8s, operator, namespace):
    apply(k8s, namespace, backfill("slow", job_name="slow sleep=1.5", start=0, end=6, parallelism=2))
    seen = set()

    def progress():
        st = get_bbf(k8s, namespace, "slow").get("status") or {}
        if st.get("status") == "transporting":
            seen.add(st["chunks_left"])
        return st.get("status") == "completed"

    wait_for(progress, 90, "completion", interval=0.1)
    assert len(seen & {1, 2, 3, 4, 5, 6}) >= 2, seen  # intermediate counts were published


def test_staging_failure_is_reported_with_the_workers_message(k8s, operator, namespace):
    obj = apply(k8s, namespace, backfill("missing", table="base.assets.nope"))
    st = wait_status(k8s, namespace, "missing", "failed", timeout=60)
    assert st["error_message"] == "staging failed: staging: table base.assets.nope does not exist or is not authorized"
    assert st["time_completed"]
    assert "num_chunks" not in st  # null in the public API: nothing was staged
    assert all(not (j.get("status") or {}).get("active") for j in jobs_of(k8s, namespace, obj["metadata"]["uid"]))
    assert jobs_of(k8s, namespace, obj["metadata"]["uid"], "transport") == []
    wait_for(
        lambda: sorted(events(k8s, namespace, "missing")) == ["Failed", "Staging"], 10, "Staging and Failed events"
    )


def test_a_chunk_that_cannot_be_delivered_fails_the_backfill_clearly(k8s, operator, namespace):
    apply(k8s, namespace, backfill("badchunk", job_name="bad fail-chunk=2", start=0, end=4, parallelism=4))
    st = wait_status(k8s, namespace, "badchunk", "failed", timeout=90)
    assert st["error_message"] == (
        "transport failed on chunk 2 of 4: kafka destination 'base-usdc-transfers-backfill' chunk 2: simulated permanent failure"
    )


def test_cancel_mid_transport_deletes_jobs_and_ends_cancelled(k8s, operator, namespace):
    obj = apply(k8s, namespace, backfill("cancelme", job_name="cancel sleep=30", start=0, end=4, parallelism=1))
    uid = obj["metadata"]["uid"]
    wait_status(k8s, namespace, "cancelme", "transporting", timeout=60)
    k8s.api(
        "PATCH",
        f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/cancelme",
        {"spec": {"cancel": True}},
    )
    st = wait_status(k8s, namespace, "cancelme", "cancelled", timeout=15)
    assert st["time_completed"] and st["chunks_left"] == 4
    wait_for(lambda: jobs_of(k8s, namespace, uid, "transport") == [], 30, "transport Job deleted")
    pods = k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector=beam-backfill.dev%2Fphase%3Dtransport")[
        "items"
    ]
    assert [p for p in pods if p["metadata"]["labels"]["beam-backfill.dev/job-id"] == uid] == []


def test_operator_killed_mid_transport_resumes_with_exactly_one_transport_job(k8s, operator, namespace):
    obj = apply(k8s, namespace, backfill("survivor", job_name="survivor sleep=1", start=0, end=8, parallelism=2))
    uid = obj["metadata"]["uid"]
    wait_status(k8s, namespace, "survivor", "transporting", timeout=60)
    operator.kill()
    try:
        # The Jobs keep running while no operator watches; status freezes.
        frozen = get_bbf(k8s, namespace, "survivor")["status"]
        assert frozen["status"] == "transporting"
    finally:
        operator.start()
    st = wait_status(k8s, namespace, "survivor", "completed", timeout=90)
    assert st["num_chunks"] == 8 and st["chunks_left"] == 0
    assert len(jobs_of(k8s, namespace, uid, "transport")) == 1
    assert len(jobs_of(k8s, namespace, uid, "staging")) == 1
    assert "found existing job" in operator.logs() or "created job" in operator.logs()


def test_deleting_a_backfill_removes_its_jobs_through_the_finalizer(k8s, operator, namespace):
    obj = apply(k8s, namespace, backfill("deleteme", job_name="delete sleep=30", start=0, end=3, parallelism=3))
    uid = obj["metadata"]["uid"]
    wait_status(k8s, namespace, "deleteme", "transporting", timeout=60)
    assert "beam-backfill.dev/cleanup" in get_bbf(k8s, namespace, "deleteme")["metadata"]["finalizers"]
    k8s.kubectl("delete", "bbf", "deleteme", "-n", namespace, "--wait=true", "--timeout=60s")
    assert jobs_of(k8s, namespace, uid) == []
