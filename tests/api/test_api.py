"""The REST API as a user's script sees it: a real `beam-api` process under the chart's
ServiceAccount, against the local control plane, with keys an administrator created."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from apiproc import KEYS_NS, ApiProcess

from beam_contract.model import destination_uid, spec_from_dict
from beam_operator.api import keys as keymod

# The seed's create example, verbatim, and its block-height form (the other documented window).
SEED_CREATE = {
    "job_name": "USDC transfers on Base — Mar 2026",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {
        "partition_key": "block_timestamp",
        "start": "2026-03-01T00:00:00",
        "end": "2026-04-01T00:00:00",
    },
    "filter": {"column": "token_address", "values": ["0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"]},
    "destinations": [{"type": "kafka", "name": "base-usdc-transfers-backfill"}],
}
SEED_CREATE_BLOCKS = {
    "job_name": "Base blocks 1M-1.1M",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {"partition_key": "block", "start": 1000000, "end": 1100000},
    "destinations": [{"type": "kafka", "name": "base-blocks-backfill"}],
    "static_egress_ip": False,
}
# The seed's list example, verbatim: the shape every listed job must have.
SEED_LIST_ITEM = {
    "job_id": "f47ac10b-58cc-4372-a567-0e02b2c3d479",
    "workflow_id": "beam-backfill-org123-f47ac10b-58cc-4372-a567-0e02b2c3d479",
    "organization_id": "org123",
    "status": "transporting",
    "job_name": "USDC transfers Jan 2024",
    "table": "ETHEREUM.RAW.ERC20_TOKEN_TRANSFER",
    "partition_key": "block_timestamp",
    "backfill_start": "2024-01-01T00:00:00",
    "backfill_end": "2024-02-01T00:00:00",
    "filter_column": "token_address",
    "filter_values": ["0xa0b86991c6218b36c1d19d4a2e9eb0ce3606eb48"],
    "destinations": [{"type": "kafka", "name": "usdc-transfers-backfill", "uid": "..."}],
    "static_egress_ip": False,
    "num_chunks": 1000,
    "chunks_left": 423,
    "error_message": None,
    "time_created": "2024-04-27T10:30:00Z",
    "time_completed": None,
}
# Fields the seed's table documents as "or null".
NULLABLE = {"filter_column", "filter_values", "num_chunks", "chunks_left", "error_message", "time_completed"}


def get_bbf_by_uid(k8s, ns, uid):
    items = json.loads(k8s.kubectl("get", "beambackfills", "-n", ns, "-o", "json").stdout)["items"]
    return next(o for o in items if o["metadata"]["uid"] == uid)


def assert_seed_shape(job: dict) -> None:
    assert set(job) == set(SEED_LIST_ITEM), set(job) ^ set(SEED_LIST_ITEM)
    for field, example in SEED_LIST_ITEM.items():
        value = job[field]
        if value is None:
            assert field in NULLABLE, f"{field} is null"
            continue
        if field in ("backfill_start", "backfill_end"):
            assert isinstance(value, (str, int)), field  # block windows report integers
        else:
            assert type(value) is type(example), f"{field}: {value!r} is not like {example!r}"
    for d in job["destinations"]:
        assert {"type", "name", "uid"} <= set(d)
        uuid.UUID(d["uid"])
    uuid.UUID(job["job_id"])
    assert job["workflow_id"] == f"beam-backfill-{job['organization_id']}-{job['job_id']}"
    assert job["time_created"].endswith("Z")
    assert job["status"] in ("staging", "transporting", "completed", "failed", "cancelled")


def test_seed_create_examples_are_accepted_and_listed_in_the_seed_shape(api, org, k8s):
    ns, key = org
    with api.client(key) as c:
        first = c.post("/backfills", json=SEED_CREATE)
        second = c.post("/backfills", json=SEED_CREATE_BLOCKS)
        assert first.status_code == 200, first.text
        assert second.status_code == 200, second.text
        for r in (first, second):
            body = r.json()
            assert set(body) == {"job_id", "workflow_id"}
            assert body["workflow_id"] == f"beam-backfill-{ns}-{body['job_id']}"
        listed = c.get("/backfills")
    assert listed.status_code == 200 and listed.headers["content-type"] == "application/json"
    jobs = listed.json()
    assert isinstance(jobs, list)
    # Ascending creation time: the order the script created them in.
    assert [j["job_id"] for j in jobs] == [first.json()["job_id"], second.json()["job_id"]]
    for j in jobs:
        assert_seed_shape(j)
    ts, blocks = jobs
    assert ts == {
        "job_id": ts["job_id"],
        "workflow_id": ts["workflow_id"],
        "organization_id": ns,
        # The operator does not run in this test: a job it has not seen yet is reported as staging.
        "status": "staging",
        "job_name": "USDC transfers on Base — Mar 2026",
        "table": "base.assets.erc20_token_transfers",
        "partition_key": "block_timestamp",
        "backfill_start": "2026-03-01T00:00:00",
        "backfill_end": "2026-04-01T00:00:00",
        "filter_column": "token_address",
        "filter_values": ["0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"],
        "destinations": [
            {
                "type": "kafka",
                "name": "base-usdc-transfers-backfill",
                "uid": destination_uid(ts["job_id"], 0, spec_from_dict(SEED_CREATE).destinations[0]),
            }
        ],
        "static_egress_ip": False,
        "num_chunks": None,
        "chunks_left": None,
        "error_message": None,
        "time_created": ts["time_created"],
        "time_completed": None,
    }
    assert (blocks["partition_key"], blocks["backfill_start"], blocks["backfill_end"]) == ("block", 1000000, 1100000)
    assert (blocks["filter_column"], blocks["filter_values"]) == (None, None)
    # The resource is the record: kubectl sees the same spec the script sent.
    obj = get_bbf_by_uid(k8s, ns, ts["job_id"])
    assert obj["spec"]["backfill_window"] == SEED_CREATE["backfill_window"]
    assert obj["spec"]["filter"] == SEED_CREATE["filter"]
    assert obj["metadata"]["creationTimestamp"] == ts["time_created"]


def test_transforms_in_the_create_body_reach_the_resource_and_the_list_keeps_the_seed_shape(api, org, k8s):
    ns, key = org
    transforms = [{"type": "v8", "script": "function transform(row) {\n  row.x = 1;\n  return row;\n}"}]
    with api.client(key) as c:
        r = c.post("/backfills", json={**SEED_CREATE, "transforms": transforms})
        assert r.status_code == 200, r.text
        [listed] = c.get("/backfills").json()
    assert_seed_shape(listed)
    assert "transforms" not in listed
    assert get_bbf_by_uid(k8s, ns, r.json()["job_id"])["spec"]["transforms"] == transforms


def test_list_filters_by_status_and_limit(api, org, k8s):
    ns, key = org
    with api.client(key) as c:
        ids = [
            c.post("/backfills", json={**SEED_CREATE_BLOCKS, "job_name": f"n{i}"}).json()["job_id"] for i in range(3)
        ]
        mark_status(
            k8s,
            ns,
            ids[1],
            {"status": "completed", "num_chunks": 2, "chunks_left": 0, "time_completed": "2026-01-01T00:00:00Z"},
        )
        assert [j["job_id"] for j in c.get("/backfills", params={"limit": 2}).json()] == ids[:2]
        assert [j["job_id"] for j in c.get("/backfills", params={"status": "completed"}).json()] == [ids[1]]
        assert [j["job_id"] for j in c.get("/backfills", params={"status": "staging"}).json()] == [ids[0], ids[2]]
        assert c.get("/backfills", params={"status": "bogus"}).status_code == 422


@pytest.mark.parametrize(
    "change, field",
    [
        (
            {
                "backfill_window": {
                    "partition_key": "block_timestamp",
                    "start": "2026-04-01T00:00:00",
                    "end": "2026-03-01T00:00:00",
                }
            },
            "backfill_window",
        ),
        (
            {
                "backfill_window": {
                    "partition_key": "block_timestamp",
                    "start": "yesterday",
                    "end": "2026-03-01T00:00:00",
                }
            },
            "backfill_window.start",
        ),
        (
            {
                "backfill_window": {
                    "partition_key": "block_timestamp",
                    "start": "0001-01-01T00:00:00+01:00",  # before year 1 in UTC: no worker could start
                    "end": "2026-03-01T00:00:00",
                }
            },
            "backfill_window.start",
        ),
        ({"backfill_window": {"partition_key": "block_height", "start": 1, "end": 2}}, "backfill_window"),
        ({"table": "base.assets; drop table x"}, "table"),
        ({"destinations": []}, "destinations"),
        ({"destinations": [{"type": "kafka", "name": "has space"}]}, "destinations.0.name"),
        ({"filter": {"column": "token_address", "values": []}}, "filter.values"),
        ({"colour": "blue"}, "colour"),
        ({"transforms": [{"type": "v8", "script": "return row;"}]}, "transforms.0.script"),
        ({"transforms": [{"type": "quickjs", "script": "function transform(r) { return r; }"}]}, "transforms.0.type"),
    ],
)
def test_invalid_bodies_answer_422_naming_the_field(api, org, k8s, change, field):
    ns, key = org
    with api.client(key) as c:
        r = c.post("/backfills", json={**SEED_CREATE, **change})
    assert r.status_code == 422, r.text
    assert field in [d["field"] for d in r.json()["detail"]], r.json()
    assert json.loads(k8s.kubectl("get", "beambackfills", "-n", ns, "-o", "json").stdout)["items"] == []


def test_a_preview_refuses_what_a_create_refuses_before_asking_anyone(api, org, k8s):
    ns, key = org
    bad = {**SEED_CREATE, "backfill_window": {"partition_key": "block", "start": 5, "end": 1}}
    with api.client(key) as c:
        r = c.post("/backfills/preview", json=bad)
        assert r.status_code == 422 and "backfill_window" in [d["field"] for d in r.json()["detail"]], r.text
        assert c.post("/backfills/preview?sample_rows=11", json=SEED_CREATE).status_code == 422
    with api.client(None) as c:
        assert c.post("/backfills/preview", json=SEED_CREATE).status_code == 401
    # nothing was asked of the operator, nothing was created
    for plural in ("beampreviews", "beambackfills"):
        assert json.loads(k8s.kubectl("get", plural, "-n", ns, "-o", "json").stdout)["items"] == []


def test_missing_fields_are_named(api, org):
    _, key = org
    with api.client(key) as c:
        r = c.post("/backfills", json={"job_name": "x"})
    assert r.status_code == 422
    assert {"table", "backfill_window", "destinations"} <= {d["field"] for d in r.json()["detail"]}


def test_organizations_are_isolated(api, org, other_org):
    ns_a, key_a = org
    ns_b, key_b = other_org
    with api.client(key_a) as a, api.client(key_b) as b:
        job = a.post("/backfills", json=SEED_CREATE).json()["job_id"]
        assert b.get("/backfills").json() == []
        assert [j["job_id"] for j in a.get("/backfills").json()] == [job]
        theirs = b.post(f"/backfills/{job}/cancel")
        unknown_id = str(uuid.uuid4())
        unknown = b.post(f"/backfills/{unknown_id}/cancel")
        # Another organization's job is indistinguishable from one that does not exist.
        assert theirs.status_code == unknown.status_code == 404
        assert theirs.json() == {"detail": f"backfill {job} not found"}
        assert unknown.json() == {"detail": f"backfill {unknown_id} not found"}
        assert a.get("/backfills").json()[0]["status"] == "staging"


def mark_status(k8s, ns, uid, status):
    """Write status as the operator would (admin, status subresource)."""
    name = get_bbf_by_uid(k8s, ns, uid)["metadata"]["name"]
    k8s.api(
        "PATCH", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills/{name}/status", {"status": status}
    )


def test_cancel_sets_the_resource_and_refuses_finished_jobs(api, org, k8s):
    ns, key = org
    with api.client(key) as c:
        job = c.post("/backfills", json=SEED_CREATE).json()["job_id"]
        r = c.post(f"/backfills/{job}/cancel")
        assert r.status_code == 200, r.text
        assert r.json() == {
            "job_id": job,
            "workflow_id": f"beam-backfill-{ns}-{job}",
            "status": "staging",
            "cancel_requested": True,
        }
        assert get_bbf_by_uid(k8s, ns, job)["spec"]["cancel"] is True
        # Asking again before the operator has acted is harmless.
        assert c.post(f"/backfills/{job}/cancel").status_code == 200
        for final in ("completed", "failed", "cancelled"):
            mark_status(k8s, ns, job, {"status": final})
            r = c.post(f"/backfills/{job}/cancel")
            assert r.status_code == 409, r.text
            assert r.json() == {
                "detail": f"backfill {job} has already ended with status {final}; there is nothing to cancel"
            }


def test_keys_are_required_and_checked(api, org, k8s):
    ns, key = org
    with api.client(None) as c:
        r = c.get("/backfills")
        assert r.status_code == 401 and r.json() == {"detail": "missing X-API-Key header"}
        assert c.post("/backfills", json=SEED_CREATE).status_code == 401
    wrong_secret = key[:-4] + ("AAAA" if not key.endswith("AAAA") else "BBBB")
    for bad in ("nonsense", wrong_secret, "bbk_000000000000_" + "A" * 43):
        with api.client(bad) as c:
            r = c.get("/backfills")
            assert r.status_code == 401 and r.json() == {"detail": "missing or invalid X-API-Key"}, bad
    # Only a digest is stored: the key itself appears nowhere in the cluster.
    secrets = k8s.kubectl("get", "secrets", "-n", KEYS_NS, "-o", "json").stdout
    assert key not in secrets and key.split("_", 2)[2] not in secrets  # the secret part may hold "_" itself


def beam_api(k8s, *args):
    return subprocess.run(
        [
            str(Path(sys.executable).parent / "beam-api"),
            "--kubeconfig",
            str(k8s.kubeconfig),
            "--keys-namespace",
            KEYS_NS,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_admin_cli_creates_lists_and_revokes_keys(api, namespace, k8s):
    out = beam_api(k8s, "keys", "create", "--org", namespace, "--description", "ci")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    key_id = key.split("_")[1]
    assert key_id in out.stderr
    listed = beam_api(k8s, "keys", "list").stdout
    assert f"{key_id}\t{namespace}\t" in listed and key not in listed
    with api.client(key) as c:
        assert c.get("/backfills").status_code == 200
        assert beam_api(k8s, "keys", "revoke", key_id).returncode == 0
        time.sleep(0.6)  # the API's key cache lasts 0.5 s in this test service (5 s by default)
        assert c.get("/backfills").status_code == 401
    assert beam_api(k8s, "keys", "revoke", key_id).returncode == 1


def test_admin_cli_errors_are_one_clear_line(api, k8s, tmp_path):
    bad_org = beam_api(k8s, "keys", "create", "--org", "orgB")
    assert bad_org.returncode == 2
    assert bad_org.stderr == (
        "beam-api: error: organization 'orgB' must be a namespace name (lowercase letters, digits, '-')\n"
    )
    # No such namespace for the keys: the apiserver's own words, on one line.
    refused = subprocess.run(
        [str(Path(sys.executable).parent / "beam-api"), "--kubeconfig", str(k8s.kubeconfig)]
        + ["--keys-namespace", "no-such-namespace", "keys", "create", "--org", "org-b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("beam-api: error: the apiserver answered HTTP 404: "), refused.stderr
    assert refused.stderr.count("\n") == 1
    missing = tmp_path / "absent.kubeconfig"
    unconfigured = subprocess.run(
        [str(Path(sys.executable).parent / "beam-api"), "--kubeconfig", str(missing), "keys", "list"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": str(missing), "HOME": str(tmp_path)},
    )
    assert unconfigured.returncode == 1 and "Traceback" not in unconfigured.stderr, unconfigured.stderr
    assert unconfigured.stderr.startswith("beam-api: error: ") and unconfigured.stderr.count("\n") == 1


def test_rate_limit_per_key_answers_429_with_retry_after(api_kubeconfig, org, other_org, tmp_path):
    limited = ApiProcess(tmp_path, kubeconfig=api_kubeconfig, rate=0.2, burst=3).start()
    try:
        with limited.client(org[1]) as a, limited.client(other_org[1]) as b:
            codes = [a.get("/backfills").status_code for _ in range(3)]
            assert codes == [200, 200, 200]
            r = a.get("/backfills")
            assert r.status_code == 429
            assert 1 <= int(r.headers["retry-after"]) <= 5
            assert "rate limit" in r.json()["detail"]
            # The bucket is per key: another organization's key is unaffected.
            assert b.get("/backfills").status_code == 200
    finally:
        limited.stop()


def test_apiserver_refusals_are_passed_on_with_their_message(api, org, k8s):
    """A cluster's own CEL admission policy refuses what the model allows: the caller gets the
    apiserver's status and message."""
    ns, key = org
    name = f"no-forbidden-tables-{ns}"[:63]
    k8s.api(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies",
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": "Fail",
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": ["beam-backfill.dev"],
                            "apiVersions": ["*"],
                            "operations": ["CREATE"],
                            "resources": ["beambackfills"],
                        }
                    ]
                },
                "validations": [
                    {
                        "expression": "!object.spec.table.startsWith('base.secret.')",
                        "message": "tables under base.secret are not for backfills",
                    }
                ],
            },
        },
    )
    k8s.api(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings",
        {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": ["Deny"],
                "matchResources": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ns}}},
            },
        },
    )
    try:
        with api.client(key) as c:
            # The apiserver applies a new policy once its informer has seen it.
            deadline = time.monotonic() + 30
            while True:
                r = c.post("/backfills", json={**SEED_CREATE, "table": "base.secret.salaries"})
                if r.status_code != 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
            assert r.status_code == 422, r.text
            assert "tables under base.secret are not for backfills" in r.json()["message"]
            assert "tables under base.secret are not for backfills" in r.json()["detail"][0]["msg"]
            assert c.post("/backfills", json=SEED_CREATE).status_code == 200
    finally:
        k8s.api("DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicybindings/{name}")
        k8s.api("DELETE", f"/apis/admissionregistration.k8s.io/v1/validatingadmissionpolicies/{name}")


def test_guessing_keys_is_rate_limited_per_client(k8s, api_kubeconfig, org, tmp_path):
    limited = ApiProcess(tmp_path, kubeconfig=api_kubeconfig, rate=0.2, burst=3).start()
    try:
        with limited.client("bbk_0123456789ab_" + "A" * 43) as guess, limited.client(org[1]) as good:
            assert good.get("/backfills").status_code == 200  # its key is now in the cache
            assert [guess.get("/backfills").status_code for _ in range(3)] == [401, 401, 401]
            r = guess.get("/backfills")
            assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
            # Once the limit is reached, further guesses (each a new key id, which no cache
            # knows) cost the apiserver nothing: the limit is checked before the lookup.
            before = _secret_gets(k8s)
            for i in range(20):
                guessed = f"bbk_{i:012x}_" + "B" * 43
                assert guess.get("/backfills", headers={"X-API-Key": guessed}).status_code == 429
            assert _secret_gets(k8s) == before
            # A valid key is never held back by someone else's failures.
            assert good.get("/backfills").status_code == 200
    finally:
        limited.stop()


def test_list_and_cancel_page_through_the_namespace(api_kubeconfig, org, k8s, tmp_path):
    """Two backfills per request to the apiserver: the list holds one page of whole objects at
    a time, and answers the same as one read would: the oldest first, the status filter and
    the limit across pages; cancel finds a job on the last page."""
    paged = ApiProcess(tmp_path, kubeconfig=api_kubeconfig, extra={"BEAM_API_LIST_PAGE_SIZE": "2"}).start()
    try:
        with paged.client(org[1]) as c:
            made = [c.post("/backfills", json={**SEED_CREATE, "job_name": f"paged {i}"}).json() for i in range(5)]
            listed = c.get("/backfills").json()
            assert [j["job_name"] for j in listed] == [f"paged {i}" for i in range(5)]
            assert [j["job_name"] for j in c.get("/backfills", params={"limit": 3}).json()] == [
                "paged 0",
                "paged 1",
                "paged 2",
            ]
            last = made[-1]["job_id"]
            assert c.post(f"/backfills/{last}/cancel").status_code == 200
            assert c.get("/backfills", params={"status": "staging", "limit": 10}).status_code == 200
    finally:
        paged.stop()


def test_a_flood_of_bad_keys_never_holds_back_a_valid_key_after_a_restart(
    k8s, api_kubeconfig, org, other_org, admin_core, tmp_path
):
    """Bad keys from one address (all clients behind one ingress share it) exhaust that
    address's failure limit. A valid key this process has never seen, after a restart, and one
    created during the flood, still get 200: the API knows every stored key id from its watch."""
    from beam_devstack.substrate.proc import wait_for

    def flood(proc: ApiProcess) -> None:
        with proc.client(None) as c:
            codes = [
                c.get("/backfills", headers={"X-API-Key": f"bbk_{i:012x}_" + "C" * 43}).status_code for i in range(8)
            ]
        assert codes[-1] == 429, codes

    first = ApiProcess(tmp_path / "first", kubeconfig=api_kubeconfig, rate=0.05, burst=3).start()
    try:
        flood(first)
        with first.client(org[1]) as good:
            assert good.get("/backfills").status_code == 200
    finally:
        first.stop()
    restarted = ApiProcess(tmp_path / "restarted", kubeconfig=api_kubeconfig, rate=0.05, burst=3).start()
    try:
        flood(restarted)
        with restarted.client(other_org[1]) as never_seen:
            r = never_seen.get("/backfills")
            assert r.status_code == 200, r.text
        _, fresh = keymod.create_key(admin_core, KEYS_NS, org[0], "made during the flood")
        with restarted.client(fresh) as c:
            wait_for(lambda: c.get("/backfills").status_code == 200, 10, "the new key known from the watch")
        # The guesses themselves cost the apiserver nothing: no Secret is read per key id.
        before = _secret_gets(k8s)
        flood_more = [f"bbk_{i:012x}_" + "D" * 43 for i in range(20)]
        with restarted.client(None) as c:
            assert {c.get("/backfills", headers={"X-API-Key": k}).status_code for k in flood_more} == {429}
        assert _secret_gets(k8s) == before
    finally:
        restarted.stop()


def _raw_post(port: int, headers: dict[str, str], body: bytes = b"", timeout: float = 10) -> tuple[int, bytes]:
    """A POST written by hand: the headers (and the start of a body, if any) go out, and the
    answer is read while the rest of the announced body is never sent."""
    import socket

    head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": "api", **headers}.items())
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"POST /api/v1/beam/backfills HTTP/1.1\r\n{head}\r\n".encode() + body)
        answer = b""
        while not _complete(answer):
            chunk = s.recv(65536)
            if not chunk:
                break
            answer += chunk
    status = int(answer.split(b" ", 2)[1])
    return status, answer


def _complete(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    if not sep:
        return False
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def test_a_body_is_neither_read_before_the_key_is_checked_nor_taken_over_the_limit(api, org):
    # 50 MB announced, nothing sent: the answer comes at once, so nothing waited for the body.
    announced = {"Content-Type": "application/json", "Content-Length": str(50_000_000)}
    status, _ = _raw_post(api.port, {**announced, "X-API-Key": "bbk_0123456789ab_" + "A" * 43})
    assert status == 401
    status, answer = _raw_post(api.port, {**announced, "X-API-Key": org[1]})
    assert status == 413 and b"request body over 1048576 bytes" in answer
    # Without a Content-Length (chunked), the body is counted as it arrives and cut at the limit.
    import httpx

    def chunks():
        yield b'{"job_name": "'
        for _ in range(300):
            yield b"x" * 8192
        yield b'"}'

    with httpx.Client(base_url=api.url + "/api/v1/beam", headers={"X-API-Key": org[1]}, timeout=30) as c:
        r = c.post("/backfills", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413 and "request body over" in r.json()["detail"]
        assert c.post("/backfills", json=SEED_CREATE).status_code == 200  # the limit leaves real specs alone


def _secret_gets(k8s) -> float:
    """kube-apiserver's own count of the GETs of Secrets it answered (its /metrics)."""
    text = k8s.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{") and 'resource="secrets"' in line and 'verb="GET"' in line
    )
