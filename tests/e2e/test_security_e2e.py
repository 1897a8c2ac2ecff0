"""The second security review (issue 25), each finding tried on the real node as an attacker
would: what they craft, and what the other organization then sees."""

from __future__ import annotations

from e2e_helpers import API, WINDOW, apply, assert_exactly, backfill, expected_ids, jobs, read_topic, wait_status

from beam_devstack.images import jobrunner_job
from beam_devstack.substrate.proc import wait_for


def _failing_job(name: str, labels: dict[str, str]) -> dict:
    return jobrunner_job(name, ["false"], labels)


def test_a_decoy_job_labelled_with_another_backfills_uid_steers_nothing(
    k8s, operator, kafka, seeded, org, namespace_factory
):
    """A Job in organization B labelled with A's uid (it is in A's webhook bodies and Kafka
    headers), and one in A's own namespace with the label but no ownerReference, both failed
    staging Jobs: A neither fails nor ends early, and delivers exactly its rows."""
    other = namespace_factory()
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    uid = apply(k8s, org, backfill("target", "e2e-decoy", window=window, suspend=True))["metadata"]["uid"]
    labels = {"beam-backfill.dev/job-id": uid, "beam-backfill.dev/phase": "staging"}
    k8s.api("POST", f"/apis/batch/v1/namespaces/{other}/jobs", _failing_job(f"target-{uid[:8]}-staging", labels))
    k8s.api("POST", f"/apis/batch/v1/namespaces/{org}/jobs", _failing_job("decoy-staging", labels))

    def both_failed() -> bool:
        found = [*jobs(k8s, other, uid), *jobs(k8s, org, uid)]
        failed = [j for j in found for c in (j.get("status") or {}).get("conditions") or [] if c["type"] == "Failed"]
        return len(failed) == 2

    wait_for(both_failed, 120, "both decoy Jobs Failed")
    k8s.api("PATCH", API.format(ns=org, name="target"), {"spec": {"suspend": False}})
    st = wait_status(k8s, org, "target", "completed")
    assert st["chunks_left"] == 0 and not st.get("error_message"), st
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-decoy"), expected_ids(seeded, window))
    # Neither decoy was the operator's to delete.
    assert [j["metadata"]["name"] for j in jobs(k8s, other, uid)] == [f"target-{uid[:8]}-staging"]
    assert "decoy-staging" in {j["metadata"]["name"] for j in jobs(k8s, org, uid)}


def test_the_managed_kafka_under_another_spelling_fails_the_backfill_and_writes_nothing(
    k8s, operator, kafka, org, namespace_factory
):
    """Organization B names the managed Kafka by its address as a decimal number and writes to
    `<A's namespace>.x`: the backfill fails naming why, and A's topic stays empty."""
    import ipaddress

    other = namespace_factory()
    host, port = kafka.bootstrap.rsplit(":", 1)
    spelled = f"{int(ipaddress.IPv4Address(host))}:{port}"
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    obj = backfill("intruder", f"{org}.x", window=window)
    obj["spec"]["destinations"] = [{"type": "kafka", "name": f"{org}.x", "bootstrap_servers": spelled}]
    apply(k8s, other, obj)
    st = wait_status(k8s, other, "intruder", "failed")
    # Refused by its resolved address, or (where the managed bootstrap is another listener of the
    # same cluster, as here: the fault tests' proxy) by the cluster id its metadata answers with.
    assert st["error_message"].startswith("transport failed on chunk 0 of 1: kafka destination"), st
    assert "is the operator's managed Kafka; omit bootstrap_servers" in st["error_message"], st
    assert read_topic(kafka.bootstrap, f"{org}.x", idle=0.5) == []


def test_a_worker_killed_for_memory_fails_the_backfill_by_its_reason_not_its_raw_log(k8s, operator, org):
    """A worker the kernel kills (its memory limit) writes no termination message; the kubelet
    must not put its raw, unmasked log there instead (terminationMessagePolicy: File), and the
    error says what happened and what to change."""
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    uid = apply(k8s, org, backfill("starved", "e2e-starved", window=window, resources={"limits": {"memory": "24Mi"}}))[
        "metadata"
    ]["uid"]
    st = wait_status(k8s, org, "starved", "failed", timeout=240)
    assert "was killed for using more memory than its limit (OOMKilled, exit code 137)" in st["error_message"], st
    assert "raise spec.resources.limits.memory" in st["error_message"]
    [staging] = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "staging"]
    [container] = staging["spec"]["template"]["spec"]["containers"]
    assert container["terminationMessagePolicy"] == "File"


def test_a_pod_orphaned_by_its_job_holds_the_deletion_only_until_it_ends(k8s, operator, bucket, org):
    """The staging Job deleted with --cascade=orphan while its worker runs, then the backfill
    deleted: the orphaned worker is waited for while it runs (it could still write staged
    files), and once it has ended the backfill goes, with nothing staged left behind. Before,
    an ended Pod without a Job held the finalizer forever."""
    from e2e_helpers import pods_of, staged_objects

    uid = apply(k8s, org, backfill("orphaned", "e2e-orphaned"))["metadata"]["uid"]

    def staging_runs():
        return [p for p in pods_of(k8s, org, uid) if (p.get("status") or {}).get("phase") == "Running"]

    [pod] = wait_for(staging_runs, 120, "the staging worker running")
    job = pod["metadata"]["labels"]["batch.kubernetes.io/job-name"]
    k8s.api("DELETE", f"/apis/batch/v1/namespaces/{org}/jobs/{job}", {"propagationPolicy": "Orphan"})
    k8s.kubectl("delete", "bbf", "-n", org, "orphaned", "--wait=false")

    def gone() -> bool:
        found = k8s.kubectl("get", "bbf", "-n", org, "--ignore-not-found", "-o", "name").stdout
        return "orphaned" not in found

    wait_for(gone, 240, "the backfill deleted once its orphaned worker ended")
    name = pod["metadata"]["name"]
    ended = k8s.api("GET", f"/api/v1/namespaces/{org}/pods/{name}")["status"]["phase"]
    assert ended in ("Succeeded", "Failed"), ended  # it ran to its end, and was waited for
    assert staged_objects(bucket, org, uid) == []


READ_ANOTHERS_CHUNK = """
import io, sys
import pyarrow.fs as fs, pyarrow.parquet as pq
data = fs.GcsFileSystem(anonymous=True, endpoint_override=sys.argv[1], scheme="http").open_input_stream(sys.argv[2]).read()
try:
    print("ROWS", pq.read_table(io.BytesIO(data)).num_rows)
except Exception:
    print("UNREADABLE", len(data))
"""


def test_a_pod_of_another_organization_reads_only_ciphertext_of_staged_files(
    k8s, operator, node_servers, bucket, org, namespace_factory
):
    """Organization A's backfill fails at its webhook and keeps its staged files. A Pod in
    organization B, on the same node with the same workers' identity and a path to the same
    bucket, reads A's staged chunk: bytes, but no parquet and no rows (seal.py)."""
    from e2e_helpers import failed_at_its_webhook, staged_objects

    uid = failed_at_its_webhook(k8s, org, "kept")
    [chunk] = [o for o in staged_objects(bucket, org, uid) if "/chunks/" in o]
    other = namespace_factory()
    host_port = node_servers["gcs"].endpoints()["host_port"]
    job = jobrunner_job("reader", ["python", "-c", READ_ANOTHERS_CHUNK, host_port, f"{bucket.name}/{chunk}"])
    k8s.api("POST", f"/apis/batch/v1/namespaces/{other}/jobs", job)

    def finished() -> bool:
        st = k8s.api("GET", f"/apis/batch/v1/namespaces/{other}/jobs/reader").get("status") or {}
        return bool(st.get("succeeded") or st.get("failed"))

    wait_for(finished, 120, "the other organization's reader")
    said = k8s.kubectl("logs", "-n", other, "job/reader").stdout
    assert said.startswith("UNREADABLE "), said
    assert int(said.split()[1]) > 0, "it did read the object's bytes: only the key is missing"
