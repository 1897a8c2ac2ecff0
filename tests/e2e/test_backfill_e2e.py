"""kubectl apply → rows in Kafka, as a user runs it (issue: end to end).

Each test applies BeamBackfills with kubectl to the real operator (under the chart's RBAC);
staging and transport run as containers of the jobrunner image on a real node (conftest.py).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from e2e_helpers import (
    API,
    WINDOW,
    Refuser,
    apply,
    assert_exactly,
    backfill,
    expected_ids,
    failed_at_its_webhook,
    jobs,
    pods_of,
    read_topic,
    staged_objects,
    status,
    wait_status,
)

from beam_devstack.pytest_plugin import NODE
from beam_devstack.substrate.kafka_proxy import END_TXN
from beam_devstack.substrate.proc import wait_for


def test_seed_example_completes_with_exactly_the_window_in_kafka(k8s, operator, kafka, seeded, bucket, org):
    ids = expected_ids(seeded)
    assert len(ids) > 5000
    obj = apply(k8s, org, backfill("usdc", "e2e-seed", parallelism=3))
    st = wait_status(k8s, org, "usdc", "completed")
    assert st["num_rows"] == len(ids)
    assert st["num_chunks"] >= 5 and st["chunks_left"] == 0
    msgs = read_topic(kafka.bootstrap, f"{org}.e2e-seed")
    assert_exactly(msgs, ids)
    sample = msgs[0][1]
    assert sample["token_address"] == "0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"
    assert (
        sample["block_timestamp"].endswith("Z")
        and "2026-03-01T00:00:00Z" <= sample["block_timestamp"] < "2026-04-01T00:00:00Z"
    )
    # staged files go once the backfill completed (retention 0)
    assert staged_objects(bucket, org, obj["metadata"]["uid"]) == []


def test_two_organizations_at_once_see_only_their_own_data_and_jobs(
    k8s, operator, kafka, seeded, org, namespace_factory
):
    other = namespace_factory()
    march_1 = {**WINDOW, "end": "2026-03-16T00:00:00"}
    march_2 = {**WINDOW, "start": "2026-03-16T00:00:00"}
    # The same destination name in both: on the managed Kafka each organization's topic is its
    # own (<namespace>.<name>), so neither writes into the other's. Two workers each: the suite's
    # node (2 CPUs, 250m per worker) runs both at once, and no Pod waits for room past the
    # suite's unschedulable_seconds (10 s), which a busy machine could otherwise make it do.
    a = apply(k8s, org, backfill("first-half", "e2e-shared", window=march_1, parallelism=2))
    b = apply(k8s, other, backfill("second-half", "e2e-shared", window=march_2, parallelism=2))
    wait_status(k8s, org, "first-half", "completed")
    wait_status(k8s, other, "second-half", "completed")
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-shared"), expected_ids(seeded, march_1))
    assert_exactly(read_topic(kafka.bootstrap, f"{other}.e2e-shared"), expected_ids(seeded, march_2))
    assert read_topic(kafka.bootstrap, "e2e-shared", idle=0.5) == []
    # Each organization's Jobs live in its own namespace and belong to its own backfill.
    assert {j["metadata"]["namespace"] for j in jobs(k8s, org, a["metadata"]["uid"])} == {org}
    assert jobs(k8s, other, a["metadata"]["uid"]) == [] and jobs(k8s, org, b["metadata"]["uid"]) == []
    assert status(k8s, other, "second-half")["workflow_id"] == f"beam-backfill-{other}-{b['metadata']['uid']}"


class _Receiver(BaseHTTPRequestHandler):
    key = b""
    rows: list = []
    bad = 0

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        ts, nonce, sig = (
            self.headers["X-Webhook-Timestamp"],
            self.headers["X-Webhook-Nonce"],
            self.headers["X-Signature-256"],
        )
        want = "sha256=" + hmac.new(self.key, f"{nonce}.{ts}.".encode() + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(want, sig) or abs(time.time() - int(ts)) > 300:
            type(self).bad += 1
            self.send_response(401)
            self.end_headers()
            return
        type(self).rows.extend(r["unique_id"] for r in json.loads(body)["rows"])
        self.send_response(200)
        self.end_headers()

    def log_message(self, *a):
        pass


def _secret(k8s, ns, name, **data):
    import base64

    body = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    k8s.api(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": body},
    )


def test_one_backfill_delivers_over_sasl_ssl_kafka_and_a_signed_https_webhook(
    k8s, operator, tenant_kafka, seeded, org, tmp_path
):
    # The organization's own Kafka (not the managed one), reached as the seed's is: SASL_SSL,
    # PLAIN, credentials and the CA from a Secret. The webhook is https with a certificate from
    # a CA of the test's own.
    kafka = tenant_kafka
    import ssl

    from beam_devstack.substrate import pki

    ca, ca_key = pki.make_ca(tmp_path / "hook-ca", "e2e-webhook-ca")
    crt, key = pki.issue_cert(tmp_path / "hook", ca, ca_key, "receiver", server=True, ips=(NODE["node_ip"],))
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(crt, key)
    _Receiver.key, _Receiver.rows, _Receiver.bad = b"e2e-signing-key", [], 0
    server = ThreadingHTTPServer((NODE["node_ip"], 0), _Receiver)  # where Pods reach the host
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _secret(k8s, org, "beam-destination-hook-key", hash_key=_Receiver.key.decode(), ssl_ca_pem=ca.read_text())
        _secret(
            k8s,
            org,
            "beam-destination-kafka-creds",
            sasl_username=kafka.sasl_user,
            sasl_password=kafka.sasl_password,
            ssl_ca_pem=kafka.ca_pem,
            endpoints=kafka.sasl_ssl_bootstrap,  # where its credentials may go (docs/security.md)
        )
        window = {**WINDOW, "end": "2026-03-08T00:00:00"}
        obj = backfill("fanout", "e2e-sasl", window=window)
        obj["spec"]["destinations"] = [
            {
                "type": "kafka",
                "name": "e2e-sasl",
                "bootstrap_servers": kafka.sasl_ssl_bootstrap,
                "secret": "beam-destination-kafka-creds",
            },
            {
                "type": "webhook",
                "name": "hook",
                "url": f"https://{NODE['node_ip']}:{server.server_port}/beam",
                "hash_key": "beam-destination-hook-key",
            },
        ]
        uid = apply(k8s, org, obj)["metadata"]["uid"]
        wait_status(k8s, org, "fanout", "completed")
        ids = expected_ids(seeded, window)
        assert_exactly(read_topic(kafka.bootstrap, "e2e-sasl"), ids)
        assert set(_Receiver.rows) == ids and _Receiver.bad == 0
    finally:
        server.shutdown()
    _logs_are_json_with_the_backfill_and_carry_no_secret(
        k8s, org, "fanout", uid, secrets=(kafka.sasl_password, _Receiver.key.decode())
    )


def _logs_are_json_with_the_backfill_and_carry_no_secret(k8s, org, name, uid, secrets):
    """Every line of the operator's, the API's and this backfill's workers' logs: one JSON object,
    the backfill's namespace, name, job_id and phase on each that concerns it, and none of the
    secret values anywhere."""
    logs = {}
    for ns, sel in (("beam-system", "app.kubernetes.io/component"), (org, f"beam-backfill.dev/job-id={uid}")):
        for pod in k8s.api("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={sel}")["items"]:
            logs[f"{ns}/{pod['metadata']['name']}"] = k8s.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    workers = [p for p in logs if p.startswith(f"{org}/")]
    assert workers and len(logs) > len(workers), list(logs)
    about = 0
    for pod, text in logs.items():
        for value in secrets:
            assert value not in text, f"a secret value in the log of {pod}"
        lines = text.splitlines()
        for n, line in enumerate(lines):
            if not line:
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise AssertionError(
                    f"not one JSON object, in the log of {pod}:\n" + "\n".join(lines[n : n + 30])
                ) from None
            if "level" not in record:
                continue  # the worker's result on stdout, itself JSON
            if pod in workers or f"{org}/{name}" in record["message"]:
                about += 1
                got = {k: record.get(k) for k in ("namespace", "name", "job_id", "phase")}
                assert got["namespace"] == org and got["name"] == name and got["job_id"] == uid, (pod, record)
                assert got["phase"], (pod, record)
    assert about >= len(workers) + 2, about  # the workers' lines and the operator's about this backfill


def test_a_chunk_the_destination_refuses_fails_the_backfill_with_its_answer(k8s, operator, org):
    Refuser.calls = 0
    server = ThreadingHTTPServer((NODE["node_ip"], 0), Refuser)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        obj = backfill("refused", "e2e-refused", window={**WINDOW, "end": "2026-03-02T00:00:00"})
        url = f"http://{NODE['node_ip']}:{server.server_port}/beam"
        obj["spec"]["destinations"] = [{"type": "webhook", "name": "refuser", "url": url}]
        uid = apply(k8s, org, obj)["metadata"]["uid"]
        st = wait_status(k8s, org, "refused", "failed")
    finally:
        server.shutdown()
    assert st["error_message"].startswith("transport failed on chunk 0 of 1: "), st
    assert "answered HTTP 400: unknown tenant" in st["error_message"], st
    assert Refuser.calls == 1  # a 400 is permanent: not retried
    assert all(not (j.get("status") or {}).get("active") for j in jobs(k8s, org, uid))
    # What the worker logged last outlives its Pod (the Jobs' TTL deletes it) in an Event.
    events = k8s.api("GET", f"/api/v1/namespaces/{org}/events?fieldSelector=involvedObject.uid%3D{uid}")["items"]
    [log] = [e for e in events if e["reason"] == "WorkerLog"]
    assert log["type"] == "Warning" and log["message"].startswith("transport chunk 0, pod "), log["message"]
    assert "last log lines: " in log["message"] and "beam_jobrunner" in log["message"], log["message"]
    described = k8s.kubectl("describe", "bbf", "refused", "-n", org).stdout
    assert "WorkerLog" in described


def test_cancel_mid_transport_stops_delivery(k8s, operator, kafka, seeded, org):
    # The one worker delivers its first chunk, then the stack's Kafka proxy holds its next commit:
    # the cancel lands mid-transport, with one chunk delivered and the rest not. (The hold starts
    # right after the create: the first commit is seconds of staging away.)
    obj = apply(k8s, org, backfill("cancelled", "e2e-cancel", parallelism=1))
    uid = obj["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, after=1, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), "the second chunk never reached its commit"
        wait_status(k8s, org, "cancelled", "transporting", until=lambda s: s["chunks_left"] < s["num_chunks"])
        k8s.api("PATCH", API.format(ns=org, name="cancelled"), {"spec": {"cancel": True}})
        st = wait_status(k8s, org, "cancelled", "cancelled", timeout=15)
        assert st["time_completed"] and st["chunks_left"] > 0
        wait_for(lambda: not jobs(k8s, org, uid) and not pods_of(k8s, org, uid), 60, "Jobs and Pods gone")
    after = len(read_topic(kafka.bootstrap, f"{org}.e2e-cancel"))
    time.sleep(3)
    assert len(read_topic(kafka.bootstrap, f"{org}.e2e-cancel")) == after, "messages kept arriving after cancel"
    assert 0 < after < len(expected_ids(seeded))


def test_a_cancel_inside_a_transaction_does_not_stall_consumers_of_the_topic(k8s, operator, kafka, org):
    # The worker is held at its commit by the stack's Kafka proxy: its chunk's rows are in an open
    # transaction when the cancel deletes its Pod. Its SIGTERM aborts that transaction, so a
    # message another producer writes afterwards reaches a read_committed consumer within 10 s
    # instead of after the broker's transaction timeout (15 minutes).
    from confluent_kafka import Producer

    from beam_devstack.substrate.kafka import consume_all

    topic = f"{org}.e2e-cancel-txn"  # the managed Kafka's topic of destination e2e-cancel-txn
    uid = apply(k8s, org, backfill("cancel-txn", "e2e-cancel-txn", parallelism=1))["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), "the transport worker never reached its commit"
        assert consume_all(kafka.bootstrap, topic, "read_uncommitted"), "the chunk's rows are in the log"
        k8s.api("PATCH", API.format(ns=org, name="cancel-txn"), {"spec": {"cancel": True}})
        wait_status(k8s, org, "cancel-txn", "cancelled", timeout=30)
        wait_for(lambda: not pods_of(k8s, org, uid), 30, "the worker's Pod gone")
        other = Producer({"bootstrap.servers": kafka.bootstrap})
        other.produce(topic, key=b"after-cancel", value=b"{}")
        assert other.flush(10) == 0
        deadline = time.monotonic() + 10
        while [m.key() for m in consume_all(kafka.bootstrap, topic)] != [b"after-cancel"]:
            assert time.monotonic() < deadline, "read_committed consumers of the topic are stalled"
            time.sleep(0.5)


def _delete_and_assert_nothing_left(k8s, org, bucket, name, uid):
    k8s.kubectl("delete", "bbf", name, "-n", org, "--wait=true", "--timeout=90s")
    assert jobs(k8s, org, uid) == []
    assert pods_of(k8s, org, uid) == []
    assert staged_objects(bucket, org, uid) == []


def test_delete_in_each_phase_leaves_no_jobs_pods_or_staged_files(k8s, operator, bucket, org):
    # staging: while its worker runs (and may be writing chunks)
    uid = apply(k8s, org, backfill("del-staging", "e2e-del-staging"))["metadata"]["uid"]
    wait_for(lambda: pods_of(k8s, org, uid), 60, "the staging Pod")
    _delete_and_assert_nothing_left(k8s, org, bucket, "del-staging", uid)
    # transporting
    uid = apply(k8s, org, backfill("del-transport", "e2e-del-transport", parallelism=1))["metadata"]["uid"]
    wait_status(k8s, org, "del-transport", "transporting")
    assert staged_objects(bucket, org, uid), "nothing was staged"
    _delete_and_assert_nothing_left(k8s, org, bucket, "del-transport", uid)
    # failed: a failed backfill keeps its staged files for debugging, until it is deleted
    uid = failed_at_its_webhook(k8s, org, "del-failed")
    assert staged_objects(bucket, org, uid), "a failed backfill keeps its staged files"
    _delete_and_assert_nothing_left(k8s, org, bucket, "del-failed", uid)


def test_a_delete_right_after_an_operator_restart_waits_for_the_workers_then_empties_the_prefix(
    k8s, operator, kafka, bucket, org
):
    # The restarted operator has empty caches when it sees the deletion: it must read the Jobs and
    # Pods from the apiserver, not conclude from its cache that none are left. The worker is held
    # inside its transaction (the stack's Kafka proxy), so it is observably running throughout.
    uid = apply(k8s, org, backfill("del-restart", "e2e-del-restart", parallelism=1))["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), "the transport worker never reached its commit"
        assert staged_objects(bucket, org, uid), "nothing was staged"
        operator.kill()
        k8s.kubectl("delete", "bbf", "del-restart", "-n", org, "--wait=false")
        operator.start()
        wait_for(
            lambda: not k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"],
            90,
            "the backfill gone",
        )
    assert jobs(k8s, org, uid) == []
    assert pods_of(k8s, org, uid) == []
    assert staged_objects(bucket, org, uid) == []


def _running_transport(k8s, ns: str, uid: str) -> list[dict]:
    """Transport Pods whose container the kubelet reports running."""
    return [
        p
        for p in pods_of(k8s, ns, uid)
        if p["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"
        and any("running" in (cs.get("state") or {}) for cs in p["status"].get("containerStatuses") or [])
    ]


def test_killed_transport_containers_are_retried_without_loss_or_duplicates(k8s, node_cluster, kafka, seeded, org):
    # Both transport workers (parallelism 2) stop at their commit, held by the stack's Kafka
    # proxy: each is inside its open transaction, observably, when containerd kills it.
    node = node_cluster[1]
    obj = apply(k8s, org, backfill("killed", "e2e-kill", parallelism=2))
    uid = obj["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(2, timeout=180), "two transport workers never reached their commit"
        # The kubelet may report the containers' start after they reached the proxy.
        deadline = time.monotonic() + 60
        while len(running := _running_transport(k8s, org, uid)) != 2:
            assert time.monotonic() < deadline, [p["status"].get("containerStatuses") for p in pods_of(k8s, org, uid)]
            time.sleep(0.5)
        for pod in running:
            container = pod["status"]["containerStatuses"][0]["containerID"].removeprefix("containerd://")
            node.ctr("tasks", "kill", "--signal", "SIGKILL", container)
        # Both are gone before the hold ends: their retries start only after it.
        names = {p["metadata"]["name"] for p in running}
        deadline = time.monotonic() + 60
        while {p["metadata"]["name"] for p in pods_of(k8s, org, uid) if p["status"]["phase"] == "Failed"} != names:
            assert time.monotonic() < deadline, "the killed Pods did not fail"
            time.sleep(0.5)
    st = wait_status(k8s, org, "killed", "completed")
    assert st["chunks_left"] == 0
    failed = [p for p in pods_of(k8s, org, uid) if p["status"]["phase"] == "Failed"]
    assert {p["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] for p in failed} == {137}
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-kill"), expected_ids(seeded))


def test_operator_killed_mid_transport_still_completes_with_one_transport_job(k8s, operator, kafka, seeded, org):
    obj = apply(k8s, org, backfill("resilient", "e2e-operator-kill", parallelism=1))
    uid = obj["metadata"]["uid"]
    wait_status(k8s, org, "resilient", "transporting")
    operator.kill()
    operator.start()
    wait_status(k8s, org, "resilient", "completed")
    transport = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert len(transport) == 1
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-operator-kill"), expected_ids(seeded))


def test_bad_spec_is_refused_and_nothing_is_created(k8s, operator, org):
    bad = backfill("bad", "e2e-bad", window={**WINDOW, "start": WINDOW["end"], "end": WINDOW["start"]})
    out = k8s.kubectl("apply", "-n", org, "-f", "-", input=json.dumps(bad), check=False)
    assert out.returncode != 0
    assert "backfill_window.start must be before end" in out.stderr
    assert k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"] == []
    assert k8s.api("GET", f"/apis/batch/v1/namespaces/{org}/jobs")["items"] == []


def test_a_dotted_name_runs_and_a_job_the_cluster_refuses_fails_the_backfill(k8s, operator, kafka, seeded, org):
    # Pod hostnames of an Indexed Job are DNS labels: the Job names must be, for any valid name.
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    apply(k8s, org, backfill("usdc.2026-03", "e2e-dotted", window=window))
    wait_status(k8s, org, "usdc.2026-03", "completed")
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-dotted"), expected_ids(seeded, window))

    # A ResourceQuota that allows no Jobs: asking again cannot help, so the backfill fails with
    # the apiserver's own reason instead of retrying forever.
    quota = {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": {"name": "no-jobs"}}
    k8s.api("POST", f"/api/v1/namespaces/{org}/resourcequotas", {**quota, "spec": {"hard": {"count/jobs.batch": "0"}}})
    wait_for(
        lambda: (
            "count/jobs.batch"
            in (k8s.api("GET", f"/api/v1/namespaces/{org}/resourcequotas/no-jobs").get("status") or {}).get("hard", {})
        ),
        30,
        "the quota in force",
    )
    uid = apply(k8s, org, backfill("over-quota", "e2e-quota", window=window))["metadata"]["uid"]
    st = wait_status(k8s, org, "over-quota", "failed", timeout=60)
    assert st["error_message"].startswith("the cluster refused the staging Job: HTTP 403 Forbidden: "), st
    assert "exceeded quota: no-jobs" in st["error_message"], st
    assert jobs(k8s, org, uid) == []


def test_a_destination_naming_the_snowflake_secret_is_refused_before_any_job(k8s, operator, org):
    # The attack of issue 14: the warehouse's credentials mapped into a NATS client's env, sent to
    # a server of the user's choice (here the node's own address; nothing may leave the machine).
    obj = backfill("exfiltrate", "unused")
    obj["spec"]["destinations"] = [
        {"type": "nats", "name": "x", "url": f"nats://{NODE['node_ip']}:4222", "secret": "beam-snowflake"}
    ]
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    st = wait_status(k8s, org, "exfiltrate", "failed", timeout=60)
    assert st["error_message"].startswith(
        "nats destination 'x': secret 'beam-snowflake' is not a destination Secret; destinations may only name "
        "Secrets whose name starts with 'beam-destination-'"
    ), st
    assert jobs(k8s, org, uid) == [] and pods_of(k8s, org, uid) == []


def test_staging_failure_is_actionable_and_leaves_nothing_running(k8s, operator, org):
    obj = backfill("missing-table", "e2e-missing")
    obj["spec"]["table"] = "base.assets.erc20_token_transfers_v9"
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    st = wait_status(k8s, org, "missing-table", "failed", timeout=120)
    assert st["error_message"] == (
        "staging failed: staging: table base.assets.erc20_token_transfers_v9 does not exist or is not authorized"
    )
    # The transport workers that started with staging are ended with it.
    wait_for(
        lambda: not [p for p in pods_of(k8s, org, uid) if p["status"]["phase"] in ("Pending", "Running")],
        60,
        "no worker Pod left running",
    )
    left = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert all(j["metadata"].get("deletionTimestamp") for j in left), left


def test_a_filter_of_10000_addresses_completes_with_exactly_the_filtered_rows(k8s, operator, kafka, seeded, org):
    # As one env variable this spec (~450 KB) failed at exec with E2BIG (Linux caps one env string
    # at 128 KiB). It now reaches the workers in a ConfigMap owned by the backfill.
    import hashlib

    from beam_devstack import dataset

    dai = dataset.TOKENS[3][0]
    absent = ["0x" + hashlib.sha256(f"absent-{i}".encode()).hexdigest()[:40] for i in range(9_998)]
    window = {**WINDOW, "end": "2026-03-03T00:00:00"}
    obj = backfill("many-addresses", "e2e-many-addresses", window=window, parallelism=2)
    obj["spec"]["filter"]["values"] = [dataset.USDC, *absent, dai]
    assert len(obj["spec"]["filter"]["values"]) == 10_000
    # Server-side: a client-side apply would copy the spec into the last-applied annotation,
    # which may hold 256 KiB at most (docs/operations.md, "Large filters").
    k8s.kubectl("apply", "--server-side", "-n", org, "-f", "-", input=json.dumps(obj))
    uid = k8s.api("GET", API.format(ns=org, name="many-addresses"))["metadata"]["uid"]
    st = wait_status(k8s, org, "many-addresses", "completed", timeout=300)
    want = expected_ids(seeded, window) | expected_ids(seeded, window, token=dai)
    assert st["chunks_left"] == 0 and want
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-many-addresses"), want)
    [cm] = [
        c
        for c in k8s.api("GET", f"/api/v1/namespaces/{org}/configmaps")["items"]
        if c["metadata"]["name"].endswith("-spec")
    ]
    assert cm["metadata"]["ownerReferences"][0]["uid"] == uid
    k8s.kubectl("delete", "bbf", "many-addresses", "-n", org, "--wait=true", "--timeout=90s")
    wait_for(
        lambda: (
            not [
                c
                for c in k8s.api("GET", f"/api/v1/namespaces/{org}/configmaps")["items"]
                if c["metadata"]["name"] == cm["metadata"]["name"]
            ]
        ),
        60,
        "the spec ConfigMap garbage-collected with its backfill",
    )


def test_a_destination_aimed_at_the_clusters_own_api_is_refused_with_a_clear_error(k8s, operator, org):
    # The classic request forgery: the in-cluster kubernetes Service (the service CIDR's first
    # address), written as a literal: the operator refuses it before any Job (the CIDR is in
    # config.cluster_cidrs). A name that resolves there is refused by the worker when it connects.
    svc = k8s.api("GET", "/api/v1/namespaces/default/services/kubernetes")["spec"]["clusterIP"]
    obj = backfill("ssrf", "e2e-ssrf", window={**WINDOW, "end": "2026-03-02T00:00:00"})
    obj["spec"]["destinations"] = [{"type": "webhook", "name": "inward", "url": f"https://{svc}/api/v1/secrets"}]
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    st = wait_status(k8s, org, "ssrf", "failed")
    assert st["error_message"].startswith(
        f"webhook destination 'inward': {svc} is {svc}, an address of the cluster's own ranges (config.cluster_cidrs); "
    ), st
    assert "unless an administrator allows the host or CIDR (config.destination_allow" in st["error_message"], st
    assert jobs(k8s, org, uid) == [], "refused before any Job"
    # Another spelling of a loopback address, and the metadata service: refused the same way.
    for name, url in (("loop", "http://2130706433:8080/x"), ("meta", "http://[::ffff:169.254.169.254]/latest")):
        obj = backfill(f"ssrf-{name}", "e2e-ssrf", window={**WINDOW, "end": "2026-03-02T00:00:00"})
        obj["spec"]["destinations"] = [{"type": "webhook", "name": "inward", "url": url}]
        uid = apply(k8s, org, obj)["metadata"]["uid"]
        st = wait_status(k8s, org, f"ssrf-{name}", "failed")
        assert "a loopback address" in st["error_message"] or "a link-local address" in st["error_message"], st
        assert jobs(k8s, org, uid) == []


def _condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions") or [] if c["type"] == type_), {})


def test_suspend_mid_transport_ends_every_pod_and_resume_delivers_exactly_the_rest(k8s, operator, kafka, seeded, org):
    topic = f"{org}.e2e-suspend"
    # The one worker delivers its first chunk and is held at the next one's commit: the suspend
    # lands inside that chunk's transaction.
    uid = apply(k8s, org, backfill("paused", "e2e-suspend", parallelism=1))["metadata"]["uid"]
    with kafka.proxy.holding(END_TXN, after=1, transactional_id=f"beam-{uid}-"):
        assert kafka.proxy.wait_held(1, timeout=180), "the next chunk never reached its commit"
        first = wait_status(k8s, org, "paused", "transporting", until=lambda s: s["chunks_left"] < s["num_chunks"])
        k8s.api("PATCH", API.format(ns=org, name="paused"), {"spec": {"suspend": True}})
        st = wait_status(
            k8s, org, "paused", "transporting", until=lambda s: _condition(s, "Suspended").get("status") == "True"
        )

        def no_worker_runs():
            return not [p for p in pods_of(k8s, org, uid) if p["status"]["phase"] in ("Pending", "Running")]

        wait_for(no_worker_runs, 60, "every worker Pod ended")
    columns = k8s.kubectl(
        "get",
        "bbf",
        "paused",
        "-n",
        org,
        "--no-headers",
        "-o",
        'custom-columns=S:.status.status,SUSPENDED:.status.conditions[?(@.type=="Suspended")].status',
    ).stdout.split()
    assert columns == ["transporting", "True"], columns
    assert "SUSPENDED" in k8s.kubectl("get", "bbf", "paused", "-n", org).stdout.splitlines()[0]
    delivered = len(read_topic(kafka.bootstrap, topic))
    assert delivered > 0 and st["chunks_left"] <= first["chunks_left"]
    time.sleep(10)  # the promise is about a span of time: nothing runs and nothing arrives in it
    assert no_worker_runs()
    assert len(read_topic(kafka.bootstrap, topic)) == delivered, "messages arrived while suspended"
    k8s.api("PATCH", API.format(ns=org, name="paused"), {"spec": {"suspend": False}})
    st = wait_status(k8s, org, "paused", "completed")
    assert _condition(st, "Suspended")["reason"] == "Resumed" and st["chunks_left"] == 0
    assert_exactly(read_topic(kafka.bootstrap, topic), expected_ids(seeded))
    [transport] = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert transport["spec"]["suspend"] is False


def test_a_backfill_created_suspended_starts_nothing_until_resumed(k8s, operator, kafka, seeded, org):
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    uid = apply(k8s, org, backfill("born-paused", "e2e-born-paused", window=window, suspend=True))["metadata"]["uid"]
    st = wait_status(
        k8s, org, "born-paused", "staging", until=lambda s: _condition(s, "Suspended").get("status") == "True"
    )
    assert jobs(k8s, org, uid) == [] and st.get("num_chunks") is None
    k8s.api("PATCH", API.format(ns=org, name="born-paused"), {"spec": {"suspend": False}})
    wait_status(k8s, org, "born-paused", "completed")
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-born-paused"), expected_ids(seeded, window))


def test_a_backfill_sets_its_workers_resources_and_retries_within_the_operators_bounds(
    k8s, operator, kafka, seeded, org
):
    window = {**WINDOW, "end": "2026-03-02T00:00:00"}
    resources = {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}}
    obj = backfill("sized", "e2e-sized", window=window, resources=resources, backoff_limit_per_index=2)
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    wait_status(k8s, org, "sized", "completed")
    assert_exactly(read_topic(kafka.bootstrap, f"{org}.e2e-sized"), expected_ids(seeded, window))
    pods = pods_of(k8s, org, uid)
    assert pods and all(p["spec"]["containers"][0]["resources"] == resources for p in pods)
    [transport] = [j for j in jobs(k8s, org, uid) if j["metadata"]["labels"]["beam-backfill.dev/phase"] == "transport"]
    assert transport["spec"]["backoffLimitPerIndex"] == 2
    # Beyond the operator's max_worker_resources (the chart's default: 16Gi): refused before any Job.
    greedy = backfill("greedy", "e2e-greedy", window=window, resources={"limits": {"memory": "64Gi"}})
    uid = apply(k8s, org, greedy)["metadata"]["uid"]
    st = wait_status(k8s, org, "greedy", "failed")
    assert st["error_message"].startswith(
        "spec.resources.limits.memory 64Gi is more than this operator allows (16Gi"
    ), st
    assert jobs(k8s, org, uid) == []


def test_a_finished_backfill_with_a_ttl_is_deleted_with_its_jobs_and_staged_files(k8s, operator, bucket, org):
    obj = backfill(
        "short-lived", "e2e-ttl", window={**WINDOW, "end": "2026-03-02T00:00:00"}, ttl_seconds_after_finished=3
    )
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    wait_for(
        lambda: not k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{org}/beambackfills")["items"],
        120,
        "the finished backfill deleted after its ttl",
    )
    assert jobs(k8s, org, uid) == [] and pods_of(k8s, org, uid) == [] and staged_objects(bucket, org, uid) == []
    events = k8s.api("GET", f"/api/v1/namespaces/{org}/events?fieldSelector=involvedObject.uid%3D{uid}")["items"]
    reasons = [e["reason"] for e in events]
    assert "Completed" in reasons and "Expired" in reasons, reasons


class _Flaky(BaseHTTPRequestHandler):
    """A receiver that answers 500 for chunk 1 until it is fixed; dedupes by Idempotency-Key."""

    broken = True
    batches: dict = {}  # Idempotency-Key -> unique_ids
    posts: list = []  # (attempt label, chunk) of every POST

    def do_POST(self):
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.posts.append(("broken" if cls.broken else "fixed", doc["chunk"]))
        if cls.broken and doc["chunk"] == 1:
            self.send_response(500)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"disk full\n\n")
            return
        cls.batches.setdefault(self.headers["Idempotency-Key"], [r["unique_id"] for r in doc["rows"]])
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_a_failed_backfill_retried_delivers_only_what_did_not_complete(k8s, operator, seeded, org):
    _Flaky.broken, _Flaky.batches, _Flaky.posts = True, {}, []
    server = ThreadingHTTPServer((NODE["node_ip"], 0), _Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        obj = backfill("retried", "unused", parallelism=1, backoff_limit_per_index=0)
        url = f"http://{NODE['node_ip']}:{server.server_port}/beam"
        obj["spec"]["destinations"] = [{"type": "webhook", "name": "flaky", "url": url}]
        uid = apply(k8s, org, obj)["metadata"]["uid"]
        st = wait_status(k8s, org, "retried", "failed", timeout=240)
        assert st["error_message"].startswith("transport failed on chunk 1 of "), st
        assert "HTTP 500: disk full" in st["error_message"], st
        # The one worker delivered chunk 0, then chunk 1 failed: attempt 1 delivered chunk 0 only.
        completed_first = {chunk for when, chunk in _Flaky.posts if when == "broken" and chunk != 1}
        assert completed_first == {0}, _Flaky.posts
        _Flaky.broken = False
        k8s.api("PATCH", API.format(ns=org, name="retried"), {"spec": {"retry": 1}})
        # Still `failed` until the operator has started attempt 2.
        wait_for(lambda: status(k8s, org, "retried").get("attempt") == 2, 60, "attempt 2 started")
        st = wait_status(k8s, org, "retried", "completed", timeout=240)
    finally:
        server.shutdown()
    assert st["attempt"] == 2 and st["chunks_left"] == 0 and "error_message" not in st, st
    delivered = Counter(i for ids in _Flaky.batches.values() for i in ids)
    assert set(delivered) == expected_ids(seeded), "rows missing or unexpected"
    assert max(delivered.values()) == 1, "a row arrived under two idempotency keys"
    again = {chunk for when, chunk in _Flaky.posts if when == "fixed"}
    assert not again & completed_first, f"chunks delivered in attempt 1 were sent again: {again & completed_first}"
    events = k8s.api("GET", f"/api/v1/namespaces/{org}/events?fieldSelector=involvedObject.uid%3D{uid}")["items"]
    [retrying] = [e for e in events if e["reason"] == "Retrying"]
    assert retrying["message"].startswith("attempt 2 (spec.retry 1): delivering the chunks not delivered yet"), retrying


def test_a_worker_no_node_can_fit_fails_the_backfill_naming_the_pod_and_what_to_do(k8s, operator, org):
    # 3 CPUs: allowed by the operator (max 4) but more than the node has. The chart's test values
    # set stuck_pod_seconds to 10.
    obj = backfill("too-big", "e2e-too-big", window={**WINDOW, "end": "2026-03-02T00:00:00"})
    obj["spec"]["resources"] = {"requests": {"cpu": "3"}}
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    st = wait_status(k8s, org, "too-big", "failed", timeout=120)
    assert st["error_message"].startswith("Pod too-big-"), st
    assert (
        ": Unschedulable: 0/1 nodes are available" in st["error_message"] and "Insufficient cpu" in st["error_message"]
    )
    assert "ask for less in spec.resources" in st["error_message"]
    wait_for(lambda: not pods_of(k8s, org, uid), 60, "the stuck Pod deleted with its Job")


def test_pods_the_cluster_refuses_to_create_fail_the_backfill_with_the_quota(k8s, operator, org):
    quota = {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": {"name": "no-pods"},
        "spec": {"hard": {"pods": "0"}},
    }
    k8s.api("POST", f"/api/v1/namespaces/{org}/resourcequotas", quota)
    apply(k8s, org, backfill("no-pods", "e2e-no-pods", window={**WINDOW, "end": "2026-03-02T00:00:00"}))
    st = wait_status(k8s, org, "no-pods", "failed", timeout=120)
    assert st["error_message"].startswith("Job no-pods-") and ": FailedCreate: " in st["error_message"], st
    assert "exceeded quota: no-pods" in st["error_message"], st
    assert "check the namespace's ResourceQuotas" in st["error_message"]


def test_a_backfill_past_its_deadline_fails_even_while_suspended(k8s, operator, org):
    obj = backfill("late", "e2e-late", suspend=True, active_deadline_seconds=5)
    apply(k8s, org, obj)
    st = wait_status(k8s, org, "late", "failed", timeout=60)
    assert st["error_message"].startswith("the backfill ran past its active_deadline_seconds (5s) with staging"), st
