"""Every transition of the pure reconcile function, including a restart in the middle of each phase.

A "restart" is modelled as what it is for the pure function: the same observed state fed in
again with no memory of earlier calls. It must ask for the same Jobs (same names), never for
a second one, and must not lose progress already recorded in status.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from beam_contract.model import BackfillStatus
from beam_operator import child_jobs
from beam_operator.config import EgressConfig, OperatorConfig
from beam_operator.reconcile import (
    CreateJob,
    DeleteJob,
    DeleteStaged,
    JobObs,
    Observed,
    PodObs,
    SuspendJob,
    WaitingPod,
    finalize_actions,
    indexes,
    reconcile,
    stuck_recheck_after,
)

NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
UID = "f47ac10b-58cc-4372-a567-0e02b2c3d479"
SPEC = {
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
CONFIG = OperatorConfig(staging_bucket="b", staging_prefix="p")
STAGE = child_jobs.child_job_name("usdc", UID, child_jobs.STAGING)
XPORT = child_jobs.child_job_name("usdc", UID, child_jobs.TRANSPORT)


def obs(status=None, jobs_=(), pods=(), spec=None, now=NOW, generation=1, refused=None, progress=None):
    return Observed(
        name="usdc",
        namespace="org123",
        uid=UID,
        generation=generation,
        creation_timestamp="2026-03-01T11:59:00Z",
        spec=spec or SPEC,
        status=status if isinstance(status, BackfillStatus) else BackfillStatus.model_validate(status or {}),
        jobs=tuple(jobs_),
        pods=tuple(pods),
        refused=refused or {},
        now=now,
        progress=progress,
    )


def staged_pod(n=3, rows=300, job=STAGE):
    return PodObs(
        job=job,
        index=None,
        succeeded=True,
        exit_code=0,
        message=json.dumps({"num_chunks": n, "num_rows": rows}),
        finished_at="2026-03-01T11:59:30Z",
    )


def run(o, config=CONFIG):
    return reconcile(o, config)


def created(d):
    return [a.manifest for a in d.actions if isinstance(a, CreateJob)]


def test_first_sight_sets_identity_and_creates_the_staging_job():
    d = run(obs())
    assert d.status.status == "staging"
    assert d.status.job_id == UID
    assert d.status.workflow_id == f"beam-backfill-org123-{UID}"
    assert d.status.num_chunks is None and d.status.time_completed is None
    assert d.status.time_created == "2026-03-01T11:59:00Z"
    [m] = created(d)
    assert m["metadata"]["name"] == STAGE
    assert m["metadata"]["ownerReferences"][0]["uid"] == UID
    assert [e.reason for e in d.events] == ["Staging"]


def _env(manifest) -> dict:
    return {e["name"]: e.get("value") for e in manifest["spec"]["template"]["spec"]["containers"][0]["env"]}


def test_transport_workers_start_once_the_staging_pod_runs_and_wait_for_the_manifest():
    st = run(obs()).status
    since = "2026-03-01T11:59:50Z"  # the staging Job's creation: 10 s ago
    pending = JobObs(STAGE, child_jobs.STAGING, active=1, ready=0, created_at=since)
    assert created(run(obs(status=st, jobs_=[pending]))) == []  # its Pod may still wait for room
    # A staging of 2 s may be a small backfill: its transport Job waits for the chunk count.
    young = JobObs(STAGE, child_jobs.STAGING, active=1, ready=1, created_at="2026-03-01T11:59:58Z")
    d = run(obs(status=st, jobs_=[young]))
    assert created(d) == [] and d.requeue_after == 3.0  # transport_prestart_seconds 5
    staging = JobObs(STAGE, child_jobs.STAGING, active=1, ready=1, created_at=since)
    d = run(obs(status=st, jobs_=[staging]))
    assert d.status.status == "staging" and d.events == []
    [m] = created(d)
    assert m["metadata"]["name"] == XPORT
    # parallelism workers, the chunk count being unknown yet; each waits for the manifest
    assert (m["spec"]["completions"], m["spec"]["parallelism"]) == (4, 4)
    env = _env(m)
    assert env["BEAM_AWAIT_MANIFEST"] == "true" and env["BEAM_TRANSPORT_WORKERS"] == "4"
    # once there, it is not asked for again; when staging ends, the backfill moves on to it
    both = [staging, JobObs(XPORT, child_jobs.TRANSPORT, active=4, ready=4, completions=4)]
    assert created(run(obs(status=st, jobs_=both))) == []
    done = [
        JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T11:59:30Z"),
        JobObs(XPORT, child_jobs.TRANSPORT, active=4, ready=4, completions=4),
    ]
    moved = run(obs(status=st, jobs_=done, pods=[staged_pod(3, 300)]))
    assert moved.status.status == "transporting" and created(moved) == []
    assert [e.reason for e in moved.events] == ["Transporting"]
    # without it (config), and while suspended, no transport Job before staging ends
    later = OperatorConfig(staging_bucket="b", staging_prefix="p", transport_prestart_seconds=None)
    assert created(run(obs(status=st, jobs_=[staging]), later)) == []
    held = JobObs(STAGE, child_jobs.STAGING, active=1, ready=1, suspended=True, created_at=since)
    assert created(run(obs(status=st, jobs_=[held]))) == []


def test_chunks_left_counts_progress_objects_and_workers_that_finished():
    st = transporting_status(10)
    # 4 workers: worker 1 delivered 1, 5 and 9 and completed; progress objects for 0, 4 and 2.
    job = JobObs(XPORT, child_jobs.TRANSPORT, active=3, ready=3, completed_indexes="1", completions=4)
    d = run(obs(status=st, jobs_=[job], progress=dict.fromkeys({0, 4, 2, 5})))
    assert d.status.chunks_left == 10 - 6
    # workers with more than one chunk each: look again at the progress interval
    assert d.requeue_after == CONFIG.progress_interval_seconds
    # one chunk per worker: the Job's status says it all
    one_each = JobObs(XPORT, child_jobs.TRANSPORT, active=2, ready=2, completed_indexes="0", completions=3)
    d = run(obs(status=transporting_status(3), jobs_=[one_each]))
    assert d.status.chunks_left == 2 and d.requeue_after is None


def test_suspend_while_staging_pauses_the_waiting_transport_workers_too():
    st = run(obs()).status
    jobs = [
        JobObs(STAGE, child_jobs.STAGING, active=1, ready=1),
        JobObs(XPORT, child_jobs.TRANSPORT, active=4, ready=4, completions=4),
    ]
    d = run(obs(status=st, jobs_=jobs, spec={**SPEC, "suspend": True}))
    assert sorted((a.name, a.suspend) for a in d.actions if isinstance(a, SuspendJob)) == [
        (STAGE, True),
        (XPORT, True),
    ]
    paused = [replace(j, suspended=True, active=0, ready=0) for j in jobs]
    resumed = run(obs(status=d.status, jobs_=paused))
    assert sorted((a.name, a.suspend) for a in resumed.actions if isinstance(a, SuspendJob)) == [
        (STAGE, False),
        (XPORT, False),
    ]


def test_restart_while_staging_asks_for_the_same_job_and_nothing_else():
    first = run(obs())
    again = run(obs(status=first.status))
    assert [m["metadata"]["name"] for m in created(again)] == [STAGE]
    assert again.events == []  # no second "Staging" event
    running = run(obs(status=first.status, jobs_=[JobObs(STAGE, child_jobs.STAGING, active=1)]))
    assert running.actions == [] and running.status.status == "staging"


def test_staging_done_records_chunks_and_starts_one_indexed_transport_job():
    st = run(obs()).status
    d = run(
        obs(
            status=st,
            jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T11:59:30Z")],
            pods=[staged_pod(3, 300)],
        )
    )
    assert d.status.status == "transporting"
    assert (d.status.num_chunks, d.status.chunks_left, d.status.num_rows) == (3, 3, 300)
    [m] = created(d)
    assert m["metadata"]["name"] == XPORT
    assert m["spec"]["completionMode"] == "Indexed"
    assert m["spec"]["completions"] == 3
    assert m["spec"]["parallelism"] == 3  # min(default 4, chunks)
    assert m["spec"]["backoffLimitPerIndex"] == 1
    assert m["spec"]["podFailurePolicy"]["rules"][0] == {
        "action": "FailIndex",
        "onExitCodes": {"operator": "In", "values": [2]},
    }
    assert "Transporting" in [e.reason for e in d.events]


def test_staging_done_but_message_not_seen_yet_waits_then_fails_clearly():
    st = run(obs()).status
    job = JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T11:59:55Z")
    d = run(obs(status=st, jobs_=[job]))
    assert d.status.status == "staging" and d.requeue_after == 1.0
    late = run(obs(status=st, jobs_=[job], now=NOW + timedelta(minutes=1)))
    assert late.status.status == "failed"
    assert "no chunk count" in late.status.error_message


def test_staging_failure_carries_the_workers_message():
    st = run(obs()).status
    pod = PodObs(
        STAGE,
        None,
        False,
        2,
        "staging: table base.assets.nope does not exist or is not authorized",
        "2026-03-01T11:59:40Z",
    )
    d = run(
        obs(
            status=st,
            jobs_=[
                JobObs(
                    STAGE,
                    child_jobs.STAGING,
                    failed=True,
                    failure_reason="PodFailurePolicy",
                    finished_at="2026-03-01T11:59:41Z",
                )
            ],
            pods=[pod],
        )
    )
    assert d.status.status == "failed"
    assert (
        d.status.error_message == "staging failed: staging: table base.assets.nope does not exist or is not authorized"
    )
    assert d.status.time_completed == "2026-03-01T12:00:00Z"
    assert [e.type for e in d.events] == ["Warning"]
    cond = {c.type: c.model_dump() for c in d.status.conditions}
    assert cond["Failed"]["status"] == "True" and cond["Failed"]["reason"] == "StagingFailed"


def test_empty_window_completes_without_transport():
    st = run(obs()).status
    d = run(
        obs(
            status=st,
            jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T11:59:30Z")],
            pods=[staged_pod(0, 0)],
        )
    )
    assert d.status.status == "completed"
    assert (d.status.num_chunks, d.status.chunks_left) == (0, 0)
    assert created(d) == []


def transporting_status(n=3):
    st = run(obs()).status
    return run(
        obs(
            status=st,
            jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T11:59:30Z")],
            pods=[staged_pod(n)],
        )
    ).status


def test_restart_while_transporting_recreates_only_the_same_transport_job():
    st = transporting_status()
    d = run(obs(status=st, jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True)]))
    assert [m["metadata"]["name"] for m in created(d)] == [XPORT]
    assert d.status.num_chunks == 3  # progress kept


def test_chunks_left_follows_completed_indexes():
    st = transporting_status(10)
    d = run(obs(status=st, jobs_=[JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-3,7", active=4)]))
    assert d.status.chunks_left == 5
    assert d.actions == [] and d.events == []


def test_transport_complete_completes_and_deletes_staged_files():
    st = transporting_status(3)
    d = run(
        obs(
            status=st,
            jobs_=[
                JobObs(
                    XPORT,
                    child_jobs.TRANSPORT,
                    complete=True,
                    completed_indexes="0-2",
                    finished_at="2026-03-01T11:59:59Z",
                )
            ],
        )
    )
    assert d.status.status == "completed" and d.status.chunks_left == 0
    assert d.status.time_completed == "2026-03-01T12:00:00Z"
    assert DeleteStaged("gs://b/p/org123/" + UID + "/") in d.actions
    assert d.status.staged_files_deleted is True


def test_retention_keeps_staged_files_until_due():
    cfg = OperatorConfig(staging_bucket="b", staging_prefix="p", staged_retention_seconds=3600)
    st = transporting_status(3)
    d = reconcile(
        obs(status=st, jobs_=[JobObs(XPORT, child_jobs.TRANSPORT, complete=True, completed_indexes="0-2")]), cfg
    )
    assert d.status.status == "completed" and not any(isinstance(a, DeleteStaged) for a in d.actions)
    assert d.requeue_after == 3600
    later = reconcile(obs(status=d.status, now=NOW + timedelta(hours=1, seconds=1)), cfg)
    assert any(isinstance(a, DeleteStaged) for a in later.actions)
    assert later.status.staged_files_deleted is True


def test_transport_failure_names_the_chunk_and_what_the_worker_said():
    from beam_contract.worker import failure_message

    st = transporting_status(5)
    # Worker 1 of 2 has chunks 1 and 3: it delivered 1, then 3 failed. Worker 0 (0, 2, 4) runs.
    pod = PodObs(
        XPORT,
        1,
        False,
        2,
        failure_message("webhook destination 'hook' chunk 3: HTTP 403 Forbidden: bad signature", 3),
        "2026-03-01T11:59:50Z",
    )
    job = JobObs(
        XPORT,
        child_jobs.TRANSPORT,
        failed=True,
        failure_reason="MaxFailedIndexesExceeded",
        failed_indexes="1",
        active=1,
        finished_at="2026-03-01T11:59:51Z",
        completions=2,
    )
    d = run(obs(status=st, jobs_=[job], pods=[pod], progress=dict.fromkeys({0, 1})))
    assert d.status.status == "failed"
    assert (
        d.status.error_message
        == "transport failed on chunk 3 of 5: webhook destination 'hook' chunk 3: HTTP 403 Forbidden: bad signature"
    )
    assert d.status.chunks_left == 3
    assert DeleteJob(XPORT) in d.actions  # nothing keeps running


def test_a_worker_per_chunk_names_its_index_as_the_chunk():
    """Transport Jobs of earlier releases: one index per chunk, and messages without the chunk."""
    st = transporting_status(5)
    pod = PodObs(XPORT, 3, False, 2, "webhook destination 'hook' chunk 3: HTTP 403", "2026-03-01T11:59:50Z")
    job = JobObs(XPORT, child_jobs.TRANSPORT, failed=True, completed_indexes="0-1", failed_indexes="3", completions=5)
    d = run(obs(status=st, jobs_=[job], pods=[pod]))
    assert d.status.error_message == "transport failed on chunk 3 of 5: webhook destination 'hook' chunk 3: HTTP 403"
    assert d.status.chunks_left == 3


@pytest.mark.parametrize("phase", ["staging", "transporting"])
def test_cancel_deletes_every_job_and_ends_cancelled(phase):
    st = run(obs()).status if phase == "staging" else transporting_status()
    running = (
        [JobObs(STAGE, child_jobs.STAGING, active=1)]
        if phase == "staging"
        else [JobObs(STAGE, child_jobs.STAGING, complete=True), JobObs(XPORT, child_jobs.TRANSPORT, active=2)]
    )
    d = run(obs(status=st, jobs_=running, spec={**SPEC, "cancel": True}, generation=2))
    assert d.status.status == "cancelled"
    assert d.status.time_completed == "2026-03-01T12:00:00Z"
    # all of them, finished staging Job included: a cancelled backfill leaves no Jobs behind
    assert [a.name for a in d.actions if isinstance(a, DeleteJob)] == [j.name for j in running]
    assert d.status.observedGeneration == 2
    assert [e.reason for e in d.events] == ["Cancelled"]


def test_cancel_after_completion_changes_nothing():
    st = transporting_status(3)
    done = run(
        obs(status=st, jobs_=[JobObs(XPORT, child_jobs.TRANSPORT, complete=True, completed_indexes="0-2")])
    ).status
    d = run(obs(status=done, spec={**SPEC, "cancel": True}))
    assert d.status.status == "completed" and d.actions == [] and d.events == []


def test_terminal_status_with_a_job_still_running_deletes_it():
    st = transporting_status(3)
    failed = {**st.document(), "status": "failed", "error_message": "x", "time_completed": "2026-03-01T12:00:00Z"}
    left = [JobObs(STAGE, child_jobs.STAGING, complete=True), JobObs(XPORT, child_jobs.TRANSPORT, active=2)]
    d = run(obs(status=failed, jobs_=left))
    assert d.actions == [DeleteJob(XPORT)]  # the finished staging Job stays for debugging
    cancelled = run(obs(status={**failed, "status": "cancelled"}, jobs_=left))
    assert cancelled.actions == [DeleteJob(STAGE), DeleteJob(XPORT)]


def test_table_not_in_allow_list_fails_with_the_list():
    cfg = OperatorConfig(allowed_tables=["base.assets.erc20_token_transfers"])
    d = reconcile(obs(spec={**SPEC, "table": "eth.raw.blocks"}), cfg)
    assert d.status.status == "failed"
    assert (
        d.status.error_message
        == "table eth.raw.blocks is not allowed by this operator; allowed tables: base.assets.erc20_token_transfers"
    )
    assert created(d) == []
    # case-insensitive, as Snowflake is for unquoted names
    assert reconcile(obs(spec={**SPEC, "table": "BASE.ASSETS.ERC20_TOKEN_TRANSFERS"}), cfg).status.status == "staging"


def test_static_egress_without_configuration_fails_clearly_and_with_it_pins_pods():
    d = run(obs(spec={**SPEC, "static_egress_ip": True}))
    assert d.status.status == "failed" and "no static egress configured" in d.status.error_message
    cfg = OperatorConfig(egress=EgressConfig(pod_labels={"egress": "static"}, node_selector={"pool": "egress"}))
    st = reconcile(obs(spec={**SPEC, "static_egress_ip": True}), cfg).status
    d = reconcile(
        obs(
            status=st,
            spec={**SPEC, "static_egress_ip": True},
            jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True)],
            pods=[staged_pod(2)],
        ),
        cfg,
    )
    pod = created(d)[0]["spec"]["template"]
    assert pod["metadata"]["labels"]["egress"] == "static"
    assert pod["spec"]["nodeSelector"] == {"pool": "egress"}


def test_invalid_spec_that_slipped_past_the_crd_fails_with_the_field():
    d = run(obs(spec={**SPEC, "destinations": []}))
    assert d.status.status == "failed"
    assert d.status.error_message.startswith("invalid spec: destinations:")


def test_reconcile_is_idempotent_on_its_own_output():
    st = transporting_status(4)
    j = [JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-1", active=2)]
    a = run(obs(status=st, jobs_=j))
    b = run(obs(status=a.status, jobs_=j))
    assert a.status == b.status and b.actions == [] and b.events == []


def test_finalize_deletes_jobs_first_and_the_staged_prefix_only_once_no_job_or_pod_is_left():
    jobs_ = [JobObs(STAGE, child_jobs.STAGING, complete=True), JobObs(XPORT, child_jobs.TRANSPORT, active=1)]
    assert finalize_actions("org123", UID, jobs_, 1, CONFIG) == [DeleteJob(STAGE), DeleteJob(XPORT)]
    # A Job already going is not asked again; its Pods still run: nothing to delete yet.
    going = [JobObs(XPORT, child_jobs.TRANSPORT, deleting=True)]
    assert finalize_actions("org123", UID, going, 1, CONFIG) == []
    # The Jobs are gone but a Pod is still terminating: its worker may still write.
    assert finalize_actions("org123", UID, [], 1, CONFIG) == []
    assert finalize_actions("org123", UID, [], 0, CONFIG) == [DeleteStaged(f"gs://b/p/org123/{UID}/")]


def test_indexes():
    assert indexes("") == []
    assert indexes("0-3,5,7-8") == [0, 1, 2, 3, 5, 7, 8]


def test_job_names_are_deterministic_and_fit_pod_hostnames():
    long = "x" * 200
    name = child_jobs.child_job_name(long, UID, child_jobs.TRANSPORT)
    assert name == child_jobs.child_job_name(long, UID, child_jobs.TRANSPORT)
    assert len(name) + len("-99999") <= 63


def test_job_names_are_dns_labels_for_every_valid_backfill_name():
    import re

    for backfill in ("usdc.2024", "a." + "b" * 250, "x-.y", "a" * 253):
        for kind in (child_jobs.STAGING, child_jobs.TRANSPORT):
            name = child_jobs.child_job_name(backfill, UID, kind)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name + "-99999"), name
            assert len(name) + len("-99999") <= 63


@pytest.mark.parametrize("phase", ["staging", "transporting"])
def test_a_job_create_refused_for_good_fails_with_the_apiservers_reason(phase):
    st = run(obs()).status if phase == "staging" else transporting_status()
    kind = child_jobs.STAGING if phase == "staging" else child_jobs.TRANSPORT
    jobs_ = [] if phase == "staging" else [JobObs(STAGE, child_jobs.STAGING, complete=True)]
    why = 'HTTP 403 Forbidden: jobs.batch "x" is forbidden: exceeded quota: jobs, requested: count/jobs.batch=1'
    d = run(obs(status=st, jobs_=jobs_, refused={kind: why}))
    assert d.status.status == "failed"
    assert d.status.error_message == f"the cluster refused the {kind} Job: {why}"
    assert created(d) == [] and [e.reason for e in d.events] == ["Failed"]
    # A cancel still wins: the user asked for it, whatever the cluster refused.
    c = run(obs(status=st, jobs_=jobs_, refused={kind: why}, spec={**SPEC, "cancel": True}))
    assert c.status.status == "cancelled"


@pytest.mark.parametrize(
    "dest",
    [
        {"type": "nats", "name": "x", "url": "nats://attacker.example:4222", "secret": "beam-snowflake"},
        {"type": "kafka", "name": "t", "bootstrap_servers": "attacker.example:9092", "secret": "beam-snowflake"},
        {"type": "webhook", "name": "h", "url": "https://attacker.example/", "hash_key": "some-other-secret"},
    ],
)
def test_a_destination_may_only_name_destination_secrets(dest):
    d = run(obs(spec={**SPEC, "destinations": [dest]}))
    assert d.status.status == "failed" and created(d) == []
    field = "hash_key" if dest["type"] == "webhook" else "secret"
    assert d.status.error_message.startswith(
        f"{dest['type']} destination '{dest['name']}': {field} '{dest[field]}' is not a destination Secret; "
        "destinations may only name Secrets whose name starts with 'beam-destination-'"
    )


def test_sns_without_a_secret_needs_the_organization_named_for_ambient_identity():
    sns = {"type": "sns", "name": "s", "topic_arn": "arn:aws:sns:us-east-1:123456789012:beam"}
    d = run(obs(spec={**SPEC, "destinations": [sns]}))
    assert d.status.status == "failed" and created(d) == []
    assert "the workers' own cloud identity is not enabled for organization org123" in d.status.error_message
    allowed = OperatorConfig(allowed_tables=CONFIG.allowed_tables, ambient_identity_namespaces="org123,org9")
    assert [m["kind"] for m in created(run(obs(spec={**SPEC, "destinations": [sns]}), allowed))] == ["Job"]
    with_secret = {**sns, "secret": "beam-destination-aws"}
    assert created(run(obs(spec={**SPEC, "destinations": [with_secret]})))


def test_the_snowflake_secret_can_never_be_a_destination_secret():
    with pytest.raises(
        ValueError, match="snowflake_secret 'beam-destination-sf' starts with destination_secret_prefix"
    ):
        OperatorConfig(snowflake_secret="beam-destination-sf")
    with pytest.raises(ValueError, match="starts with destination_secret_prefix 'beam-'"):
        OperatorConfig(destination_secret_prefix="beam-")
    with pytest.raises(ValueError):
        OperatorConfig(destination_secret_prefix="")


def test_secrets_reach_workers_only_as_secret_refs():
    spec = {
        **SPEC,
        "destinations": [
            {"type": "kafka", "name": "t", "bootstrap_servers": "k:9092", "secret": "beam-destination-kafka-creds"},
            {
                "type": "webhook",
                "name": "h",
                "url": "https://example.test/hook",
                "hash_key": "beam-destination-hook-key",
            },
        ],
    }
    from beam_contract.model import BackfillSpec

    m = child_jobs.transport_job("usdc", "org123", UID, BackfillSpec.model_validate(spec), CONFIG, 2)
    env = {e["name"]: e for e in m["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BEAM_DEST_0_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "beam-destination-kafka-creds",
        "key": "sasl_password",
        "optional": True,
    }
    assert env["BEAM_DEST_1_HASH_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "beam-destination-hook-key"
    assert (
        json.loads(env["BEAM_SPEC"]["value"])["destinations"][1]["hash_key"] == "beam-destination-hook-key"
    )  # a name, not a value
    assert all("value" not in e for k, e in env.items() if k.startswith("BEAM_DEST_"))


def test_worker_env_reaches_workers_but_cannot_override_the_contract(monkeypatch):
    from beam_contract.model import BackfillSpec

    cfg = OperatorConfig(worker_env={"BEAM_CHUNK_ROW_GROUP_ROWS": "500", "BEAM_JOB_ID": "forged"})
    m = child_jobs.staging_job("usdc", "org123", UID, BackfillSpec.model_validate(SPEC), cfg)
    env = {e["name"]: e.get("value") for e in m["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["BEAM_CHUNK_ROW_GROUP_ROWS"] == "500"
    assert env["BEAM_JOB_ID"] == UID
    monkeypatch.setenv("BEAM_WORKER_ENV", '{"A": "1"}')
    assert OperatorConfig().worker_env == {"A": "1"}


def _addresses(n: int, seed: int = 0) -> list[str]:
    import hashlib

    return ["0x" + hashlib.sha256(f"{seed}-{i}".encode()).hexdigest()[:40] for i in range(n)]


def test_a_large_spec_reaches_both_jobs_through_one_owned_configmap_not_the_env():
    import base64
    import gzip

    from beam_contract.worker import SPEC_CONFIGMAP_KEY, SPEC_MOUNT_DIR

    big = {**SPEC, "filter": {"column": "token_address", "values": _addresses(10_000)}}
    first = run(obs(spec=big))
    [create] = [a for a in first.actions if isinstance(a, CreateJob)]
    cm = create.config_map
    assert cm["metadata"]["name"] == child_jobs.spec_config_map_name("usdc", UID)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == UID and cm["immutable"] is True
    doc = json.loads(gzip.decompress(base64.b64decode(cm["binaryData"][SPEC_CONFIGMAP_KEY])))
    assert doc["filter"]["values"] == big["filter"]["values"]
    staged = run(
        obs(
            status=first.status, spec=big, jobs_=[JobObs(STAGE, child_jobs.STAGING, complete=True)], pods=[staged_pod()]
        )
    )
    [xport] = [a for a in staged.actions if isinstance(a, CreateJob)]
    assert xport.config_map == cm  # the same one, found existing (409) at the second create
    for job in (create.manifest, xport.manifest):
        pod = job["spec"]["template"]["spec"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert "BEAM_SPEC" not in env and env["BEAM_SPEC_FILE"] == f"{SPEC_MOUNT_DIR}/{SPEC_CONFIGMAP_KEY}"
        assert pod["volumes"] == [{"name": "spec", "configMap": {"name": cm["metadata"]["name"]}}]
        assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == SPEC_MOUNT_DIR
        # Linux's limit for one env string is 128 KiB: every value must stay far below it.
        assert max(len(e.get("value") or "") for e in pod["containers"][0]["env"]) < 32 * 1024
    # A small spec stays in the env, with no ConfigMap (one API call fewer per backfill).
    [small] = [a for a in run(obs()).actions if isinstance(a, CreateJob)]
    assert small.config_map is None and "volumes" not in small.manifest["spec"]["template"]["spec"]


def test_a_spec_no_configmap_can_carry_fails_before_any_job_with_what_to_do():
    import random

    rnd = random.Random(7)  # hardly compressible: 1,500 values of 1,024 random characters
    values = [
        "".join(rnd.choice("abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(1024))
        for _ in range(1500)
    ]
    d = run(obs(spec={**SPEC, "filter": {"column": "token_address", "values": values}}))
    assert d.status.status == "failed" and not created(d)
    assert (
        "more than the" in d.status.error_message
        and "split filter.values over several backfills" in d.status.error_message
    )


def test_a_managed_kafka_topic_longer_than_kafka_allows_fails_before_any_job():
    # <namespace>.<name> on the managed Kafka: org123 (6) + "." + 243 characters is 250.
    long = {**SPEC, "destinations": [{"type": "kafka", "name": "t" * 243}]}
    d = run(obs(spec=long))
    assert d.status.status == "failed" and not created(d)
    assert "more than Kafka's 249; in this namespace a name may have at most 242" in d.status.error_message
    assert run(obs(spec={**SPEC, "destinations": [{"type": "kafka", "name": "t" * 242}]})).status.status == "staging"
    # An external Kafka is the organization's own: the name is the topic, up to 249.
    ext = {"type": "kafka", "name": "t" * 249, "bootstrap_servers": "kafka.example.com:9092"}
    assert run(obs(spec={**SPEC, "destinations": [ext]})).status.status == "staging"


def _suspended(d) -> str | None:
    return next((c.status for c in d.status.conditions if c.type == "Suspended"), None)


def test_a_backfill_created_suspended_starts_nothing_until_resumed():
    d = run(obs(spec={**SPEC, "suspend": True}))
    assert d.status.status == "staging" and not created(d) and _suspended(d) == "True"
    assert [e.reason for e in d.events] == ["Staging", "Suspended"]
    again = run(obs(status=d.status, spec={**SPEC, "suspend": True}))
    assert again.actions == [] and again.events == [] and again.status == d.status
    resumed = run(obs(status=d.status, spec={**SPEC, "suspend": False}))
    assert created(resumed) and created(resumed)[0]["spec"]["suspend"] is False
    assert _suspended(resumed) == "False" and [e.reason for e in resumed.events] == ["Resumed"]


def test_suspend_mid_transport_suspends_the_job_and_resume_lets_it_go_on():
    from beam_operator.reconcile import SuspendJob

    st = transporting_status(4)
    running = JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-1", active=1)
    d = run(obs(status=st, jobs_=[running], spec={**SPEC, "suspend": True}))
    assert d.actions == [SuspendJob(XPORT, True)] and d.status.status == "transporting"
    assert d.status.chunks_left == 2 and _suspended(d) == "True"
    assert "while 2 of 4 chunks left" in next(c.message for c in d.status.conditions if c.type == "Suspended")
    # The Job is suspended now: nothing more to ask, and the status stays as it is.
    paused = JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-1", suspended=True)
    again = run(obs(status=d.status, jobs_=[paused], spec={**SPEC, "suspend": True}))
    assert again.actions == [] and again.events == []
    resumed = run(obs(status=d.status, jobs_=[paused], spec={**SPEC, "suspend": False}))
    assert resumed.actions == [SuspendJob(XPORT, False)] and _suspended(resumed) == "False"
    # A Job that finished as it was being suspended ends the backfill as usual.
    done = JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-3", complete=True, suspended=True)
    assert run(obs(status=d.status, jobs_=[done], spec={**SPEC, "suspend": True})).status.status == "completed"


def test_a_queued_backfill_leaves_unsuspending_its_jobs_to_kueue():
    from dataclasses import replace

    d = run(replace(obs(), queue_name="team-a"))
    [job] = created(d)
    assert job["metadata"]["labels"][child_jobs.QUEUE_NAME_LABEL] == "team-a" and job["spec"]["suspend"] is True
    waiting = JobObs(STAGE, child_jobs.STAGING, suspended=True, queued=True)
    assert run(replace(obs(status=d.status, jobs_=[waiting]), queue_name="team-a")).actions == []


def test_cancel_wins_over_suspend():
    st = transporting_status(4)
    paused = JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0-1", suspended=True)
    d = run(obs(status=st, jobs_=[paused], spec={**SPEC, "suspend": True, "cancel": True}))
    assert d.status.status == "cancelled" and DeleteJob(XPORT) in d.actions


def test_spec_resources_go_over_the_operators_defaults_and_stay_within_its_bounds():
    config = OperatorConfig(
        staging_bucket="b",
        staging_prefix="p",
        worker_resources={"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
        max_worker_resources={"cpu": "2", "memory": "8Gi"},
        max_backoff_limit_per_index=3,
    )
    asked = {**SPEC, "resources": {"requests": {"memory": "3Gi"}, "limits": {"memory": "4Gi", "cpu": "2"}}}
    [job] = created(run(obs(spec={**asked, "backoff_limit_per_index": 3}), config))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "500m", "memory": "3Gi"},
        "limits": {"memory": "4Gi", "cpu": "2"},
    }
    st = transporting_status(4)
    staged = run(obs(status=st, spec={**asked, "backoff_limit_per_index": 3}), config)
    assert created(staged)[0]["spec"]["backoffLimitPerIndex"] == 3
    assert created(run(obs(status=st), config))[0]["spec"]["backoffLimitPerIndex"] == config.backoff_limit_per_index
    for spec, why in [
        (
            {**SPEC, "resources": {"limits": {"cpu": "2500m"}}},
            "spec.resources.limits.cpu 2500m is more than this operator allows (2, config.max_worker_resources)",
        ),
        ({**SPEC, "resources": {"requests": {"memory": "9Gi"}}}, "spec.resources.requests.memory 9Gi is more than"),
        (
            {**SPEC, "resources": {"requests": {"memory": "3Gi"}}},
            "spec.resources.requests.memory 3Gi is more than its limit 2Gi",
        ),
        ({**SPEC, "backoff_limit_per_index": 4}, "spec.backoff_limit_per_index 4 is more than this operator allows (3"),
    ]:
        d = run(obs(spec=spec), config)
        assert d.status.status == "failed" and not created(d), spec
        assert why in d.status.error_message, d.status.error_message


def test_a_finished_backfill_is_deleted_once_its_ttl_has_passed():
    from beam_operator.reconcile import DeleteBackfill

    done = BackfillStatus.model_validate(
        {
            **transporting_status(3).document(),
            "status": "completed",
            "chunks_left": 0,
            "time_completed": "2026-03-01T11:00:00Z",
        }
    )
    done.staged_files_deleted = True
    # Off by default: kept, with nothing to wake up for.
    kept = run(obs(status=done))
    assert kept.actions == [] and kept.requeue_after is None
    spec = {**SPEC, "ttl_seconds_after_finished": 7200}  # ended 11:00, now 12:00: one hour to go
    waiting = run(obs(status=done, spec=spec))
    assert waiting.actions == [] and waiting.requeue_after == 3600
    later = run(obs(status=done, spec=spec, now=NOW + timedelta(hours=1)))
    assert later.actions == [DeleteBackfill()] and [e.reason for e in later.events] == ["Expired"]
    # The operator's default applies when the spec says nothing, and the spec wins over it.
    config = OperatorConfig(staging_bucket="b", staging_prefix="p", backfill_ttl_seconds=60)
    assert run(obs(status=done), config).actions == [DeleteBackfill()]
    assert run(obs(status=done, spec={**SPEC, "ttl_seconds_after_finished": 7200}), config).actions == []
    failed = BackfillStatus.model_validate({**done.document(), "status": "failed", "error_message": "x"})
    assert run(obs(status=failed, spec={**SPEC, "ttl_seconds_after_finished": 0})).actions == [DeleteBackfill()]


def test_a_failed_workers_last_log_lines_outlive_its_pod_in_an_event():
    from beam_contract.worker import LOG_TAIL_MARK

    st = transporting_status(5)
    said = f"webhook destination 'hook' chunk 3: answered HTTP 500: boom\nfailed chunk: 3\n{LOG_TAIL_MARK}\nfirst line\n\nlast line"
    pod = PodObs(XPORT, 1, False, 2, said, "2026-03-01T11:59:50Z", name="usdc-xport-1-abcde")
    job = JobObs(
        XPORT, child_jobs.TRANSPORT, failed=True, failure_reason="FailedIndexes", failed_indexes="1", completions=2
    )
    d = run(obs(status=st, jobs_=[job], pods=[pod]))
    assert (
        d.status.error_message
        == "transport failed on chunk 3 of 5: webhook destination 'hook' chunk 3: answered HTTP 500: boom"
    )
    [log] = [e for e in d.events if e.reason == "WorkerLog"]
    assert log.type == "Warning"
    assert log.message == "transport chunk 3, pod usdc-xport-1-abcde, last log lines: first line | last line"
    # Bounded: the newest lines are kept.
    long = PodObs(XPORT, 1, False, 2, said + "\n" + "x" * 5000 + "\nthe end", "2026-03-01T11:59:51Z", name="p")
    [log] = [e for e in run(obs(status=st, jobs_=[job], pods=[long])).events if e.reason == "WorkerLog"]
    # Within what an Event keeps (1,024 characters), so that its cut never drops the newest.
    assert log.message.endswith(" | the end") and len(log.message) == 1024
    assert log.message.startswith("transport chunk 3, pod p, last log lines: …x")


def test_a_worker_killed_for_memory_is_reported_by_its_reason_not_its_log():
    st = transporting_status(5)
    pod = PodObs(XPORT, 1, False, 137, "", "2026-03-01T11:59:50Z", name="usdc-xport-1-abcde", reason="OOMKilled")
    job = JobObs(
        XPORT, child_jobs.TRANSPORT, failed=True, failure_reason="FailedIndexes", failed_indexes="1", completions=2
    )
    d = run(obs(status=st, jobs_=[job], pods=[pod]))
    assert d.status.error_message.startswith(
        "transport failed on a chunk of 5: worker usdc-xport-1-abcde was killed for using more memory than its "
        "limit (OOMKilled, exit code 137); raise spec.resources.limits.memory"
    ), d.status.error_message


def _failed_in_transport(n=4, done="0-1,3"):
    st = BackfillStatus.model_validate(
        {
            **transporting_status(n).document(),
            "status": "failed",
            "chunks_left": 1,
            "error_message": "transport failed on chunk 2 of 4: answered HTTP 500",
            "time_completed": "2026-03-01T11:59:00Z",
        }
    )
    job = JobObs(XPORT, child_jobs.TRANSPORT, failed=True, completed_indexes=done, failed_indexes="2")
    return st, job


def test_a_retry_delivers_only_what_did_not_complete_with_the_staged_files_reused():
    st, failed = _failed_in_transport()
    assert run(obs(status=st, jobs_=[failed])).actions == []  # no retry asked: stays failed
    d = run(obs(status=st, jobs_=[failed], spec={**SPEC, "retry": 1}))
    assert d.status.status == "transporting" and d.status.attempt == 2
    assert d.status.error_message is None and d.status.time_completed is None
    [ev] = [e for e in d.events if e.reason == "Retrying"]
    assert ev.message == (
        "attempt 2 (spec.retry 1): delivering the chunks not delivered yet (1 of 4 did not complete in attempt 1); "
        "staged files reused"
    )
    [job] = created(d)
    assert job["metadata"]["name"] == child_jobs.child_job_name("usdc", UID, child_jobs.TRANSPORT, 2) != XPORT
    assert job["metadata"]["labels"][child_jobs.LABEL_ATTEMPT] == "2" and job["spec"]["completions"] == 4
    # The next reconcile sees attempt 1's failed Job and attempt 2's running one: only the latter counts.
    running = JobObs(job["metadata"]["name"], child_jobs.TRANSPORT, completed_indexes="0-1", active=1, attempt=2)
    again = run(obs(status=d.status, jobs_=[failed, running], spec={**SPEC, "retry": 1}))
    assert again.status.status == "transporting" and again.status.chunks_left == 2 and not created(again)
    # Failed again: retry 1 is spent; retry 2 makes attempt 3.
    failed2 = JobObs(job["metadata"]["name"], child_jobs.TRANSPORT, failed=True, failed_indexes="2", attempt=2)
    pod = PodObs(job["metadata"]["name"], 2, False, 2, "webhook: answered HTTP 500", "2026-03-01T12:00:10Z")
    end = run(obs(status=again.status, jobs_=[failed, failed2], pods=[pod], spec={**SPEC, "retry": 1}))
    assert end.status.status == "failed" and end.status.attempt == 2
    assert run(obs(status=end.status, jobs_=[failed, failed2], spec={**SPEC, "retry": 1})).actions == []
    third = run(obs(status=end.status, jobs_=[failed, failed2], spec={**SPEC, "retry": 2}))
    assert third.status.attempt == 3 and created(third)[0]["metadata"]["name"].endswith("-transport-3")


def test_a_retry_stages_again_when_nothing_staged_is_left():
    from dataclasses import replace

    st, failed = _failed_in_transport()
    d = run(replace(obs(status=st, jobs_=[failed], spec={**SPEC, "retry": 1}), staged=False))
    assert d.status.status == "staging" and d.status.num_chunks is None and d.status.attempt == 2
    assert "staging again (the staged files are gone)" in d.events[0].message
    [job] = created(d)
    assert job["metadata"]["name"] == child_jobs.child_job_name("usdc", UID, child_jobs.STAGING, 2)
    # Failed in staging: nothing staged to reuse.
    failed_staging = BackfillStatus.model_validate(
        {
            "status": "failed",
            "job_id": UID,
            "error_message": "staging failed: x",
            "time_completed": "2026-03-01T11:59:00Z",
        }
    )
    d = run(obs(status=failed_staging, spec={**SPEC, "retry": 1}))
    assert d.status.status == "staging" and "staging again (no staged files to reuse)" in d.events[0].message


def test_retry_job_names_fit_pod_hostnames():
    for attempt in (2, 999):
        name = child_jobs.child_job_name("x" * 200, UID, child_jobs.TRANSPORT, attempt)
        assert len(name) + len("-99999") <= 63 and name.endswith(f"-transport-{attempt}")
    assert child_jobs.child_job_name("usdc", UID, child_jobs.TRANSPORT, 1) == XPORT  # unchanged since 0.1


def test_a_backfill_past_its_deadline_fails_and_its_jobs_are_deleted():
    st = transporting_status(4)
    st.time_created = "2026-03-01T11:00:00Z"  # an hour before NOW
    running = JobObs(XPORT, child_jobs.TRANSPORT, completed_indexes="0", active=1, ready=1)
    before = run(obs(status=st, jobs_=[running], spec={**SPEC, "active_deadline_seconds": 7200}))
    assert before.status.status == "transporting" and before.requeue_after == 3600
    d = run(obs(status=st, jobs_=[running], spec={**SPEC, "active_deadline_seconds": 3600}))
    assert d.status.status == "failed" and DeleteJob(XPORT) in d.actions
    assert d.status.error_message.startswith(
        "the backfill ran past its active_deadline_seconds (3600s) with 3 of 4 chunks left; raise"
    )
    config = OperatorConfig(staging_bucket="b", staging_prefix="p", default_active_deadline_seconds=60)
    assert run(obs(status=st, jobs_=[running]), config).status.status == "failed"
    assert run(obs(status=st, jobs_=[running])).status.status == "transporting"  # none by default


def test_a_pod_stuck_longer_than_allowed_fails_the_backfill_naming_pod_reason_and_remedy():
    from dataclasses import replace

    st = transporting_status(4)
    waiting = JobObs(XPORT, child_jobs.TRANSPORT, active=1, ready=0, created_at="2026-03-01T11:50:00Z")
    pod = WaitingPod(
        XPORT,
        "usdc-xport-0-abcde",
        "Unschedulable",
        "0/1 nodes are available: 1 Insufficient cpu.",
        "2026-03-01T11:50:00Z",
    )
    # Unschedulable for 600 s: a full cluster may still make room (default unschedulable_seconds 3600).
    assert run(replace(obs(status=st, jobs_=[waiting]), waiting=(pod,))).status.status == "transporting"
    config = OperatorConfig(staging_bucket="b", staging_prefix="p", unschedulable_seconds=300)
    d = run(replace(obs(status=st, jobs_=[waiting]), waiting=(pod,)), config)
    assert d.status.status == "failed" and DeleteJob(XPORT) in d.actions
    assert d.status.error_message == (
        "Pod usdc-xport-0-abcde has been waiting 600s: Unschedulable: 0/1 nodes are available: 1 Insufficient cpu.; "
        "no node can run it: ask for less in spec.resources, or check the nodes' capacity, taints and the static "
        "egress node selector (a full cluster: config.unschedulable_seconds)"
    )
    pull = replace(pod, reason="ImagePullBackOff", message="Back-off pulling image")
    d = run(replace(obs(status=st, jobs_=[waiting]), waiting=(pull,)))  # 600 s, over stuck_pod_seconds 300
    assert d.status.error_message.startswith("Pod usdc-xport-0-abcde has been waiting 600s: ImagePullBackOff: ")
    recent = replace(pod, since="2026-03-01T11:58:00Z")
    d = run(replace(obs(status=st, jobs_=[waiting]), waiting=(recent,)))
    assert d.status.status == "transporting" and d.requeue_after == 15.0  # looked at again soon
    refused = WaitingPod(
        XPORT, "", "FailedCreate", 'pods "x" is forbidden: exceeded quota: no-pods', "2026-03-01T11:50:00Z"
    )
    d = run(replace(obs(status=st, jobs_=[waiting]), waiting=(refused,)))
    assert d.status.error_message.startswith(f"Job {XPORT} has been waiting 600s: FailedCreate: pods")
    assert "check the namespace's ResourceQuotas" in d.status.error_message


def test_pods_that_only_wait_for_a_node_are_listed_less_often_but_never_past_their_limit():
    pod = WaitingPod(XPORT, "usdc-xport-0-abcde", "Unschedulable", "0/1 nodes: Too many pods", "2026-03-01T11:50:00Z")
    # Waiting 600 s of 3600: every minute, not every 15 s.
    assert stuck_recheck_after((pod,), NOW, CONFIG) == 60.0
    # 20 s before unschedulable_seconds: then, and not a minute later.
    config = OperatorConfig(staging_bucket="b", staging_prefix="p", unschedulable_seconds=620)
    assert stuck_recheck_after((pod,), NOW, config) == 20.0
    # Never more often than any stuck Pod (a limit shorter than that, or passed already).
    assert stuck_recheck_after((pod,), NOW, OperatorConfig(unschedulable_seconds=10)) == 15.0
    # Nothing found, or any other reason among them: the usual 15 s.
    pull = WaitingPod(XPORT, "usdc-xport-1-fghij", "ImagePullBackOff", "Back-off", "2026-03-01T11:50:00Z")
    assert stuck_recheck_after((), NOW, CONFIG) == 15.0
    assert stuck_recheck_after((pod, pull), NOW, CONFIG) == 15.0


@pytest.mark.parametrize(
    "dest, why",
    [
        ({"type": "webhook", "name": "h", "url": "http://127.1:8080/x"}, "127.0.0.1, a loopback address"),
        ({"type": "webhook", "name": "h", "url": "http://0xa9fea9fe/latest"}, "169.254.169.254, a link-local address"),
        ({"type": "nats", "name": "s", "url": "nats://8.8.8.8:4222,nats://[fd00::1]:4222"}, "fd00::1, a private"),
        (
            {
                "type": "sns",
                "name": "s",
                "topic_arn": "arn:aws:sns:us-east-1:123456789012:t",
                "secret": "beam-destination-a",
                "endpoint_url": "http://10.0.0.7:4566",
            },
            "10.0.0.7, a private address",
        ),
        ({"type": "kafka", "name": "k", "bootstrap_servers": "SASL_SSL://[::1]:9093"}, "::1, a loopback address"),
    ],
)
def test_an_inward_literal_destination_is_refused_before_any_job(dest, why):
    d = run(obs(spec={**SPEC, "destinations": [dest]}))
    assert d.status.status == "failed" and why in d.status.error_message, d.status.error_message
    assert "config.destination_allow" in d.status.error_message
    assert not any(isinstance(a, CreateJob) for a in d.actions)


def test_an_allowed_or_named_destination_is_left_to_the_worker():
    allowed = OperatorConfig(destination_allow=["127.0.0.0/8"])
    for url in ("http://127.1:8080/x", "http://localhost:8080/x", "https://hooks.example.com/x"):
        config = allowed if url.startswith("http://127") else OperatorConfig()
        d = run(obs(spec={**SPEC, "destinations": [{"type": "webhook", "name": "h", "url": url}]}), config)
        assert d.status.status != "failed", (url, d.status.error_message)


def test_workers_have_requests_and_limits_by_default_and_a_lower_spec_limit_lowers_the_default_request():
    config = OperatorConfig(staging_bucket="b", staging_prefix="p")
    [job] = created(run(obs(), config))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "250m", "memory": "512Mi"},
        "limits": {"memory": "2Gi"},
    }
    small = {**SPEC, "resources": {"limits": {"memory": "256Mi"}}}
    [job] = created(run(obs(spec=small), config))
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "250m", "memory": "256Mi"},
        "limits": {"memory": "256Mi"},
    }


def test_a_namespace_at_its_limits_gets_no_new_backfill_started():
    from dataclasses import replace

    config = OperatorConfig(
        staging_bucket="b", staging_prefix="p", max_live_backfills_per_namespace=3, max_spec_bytes_per_namespace=10_000
    )
    fresh = obs()
    assert created(run(replace(fresh, namespace_load=(2, 1_000, 1_000)), config))
    full = run(replace(fresh, namespace_load=(3, 1_000, 1_000)), config)
    assert full.status.status == "failed" and not created(full)
    assert "already holds 3 live backfills, the most this operator allows one organization" in full.status.error_message
    heavy = run(replace(fresh, namespace_load=(1, 9_500, 1_000)), config)
    assert heavy.status.status == "failed" and "config.max_spec_bytes_per_namespace" in heavy.status.error_message
    assert created(run(replace(fresh, namespace_load=None), config)), "a started backfill is never counted again"


# --- rows_delivered, time_staging_started, time_transporting_started ---------------------------


def _at(minutes: float) -> datetime:
    return NOW + timedelta(minutes=minutes)


def _iso(minutes: float) -> str:
    return _at(minutes).strftime("%Y-%m-%dT%H:%M:%SZ")


STAGED = JobObs(STAGE, child_jobs.STAGING, complete=True, finished_at="2026-03-01T12:09:30Z")


def _transporting_at_10(n=3, rows=300):
    """Staging Job created at NOW, finished at NOW+10 min: transporting since then."""
    st = run(obs()).status
    return run(obs(status=st, jobs_=[STAGED], pods=[staged_pod(n, rows)], now=_at(10))).status


def test_staging_then_transporting_then_completed_sets_the_times_and_counts_rows_up():
    first = run(obs())
    st = first.status
    # The staging Job is asked for now: its time is written with the create.
    assert created(first) and st.time_staging_started == _iso(0)
    assert (st.rows_delivered, st.time_transporting_started, st.num_rows) == (None, None, None)
    running = JobObs(STAGE, child_jobs.STAGING, active=1, ready=0, created_at=_iso(0))
    later = run(obs(status=st, jobs_=[running], now=_at(5))).status
    assert later.time_staging_started == _iso(0), "set once per attempt"

    moved = run(obs(status=later, jobs_=[STAGED], pods=[staged_pod(3, 300)], now=_at(10)))
    st = moved.status
    assert (st.status, st.num_rows, st.rows_delivered) == ("transporting", 300, 0)
    assert (st.time_staging_started, st.time_transporting_started) == (_iso(0), _iso(10))
    assert st.time_completed is None

    # 2 workers share 3 chunks (0 and 2; 1): the progress objects' rows are summed.
    job = JobObs(XPORT, child_jobs.TRANSPORT, active=2, ready=2, completions=2)
    d = run(obs(status=st, jobs_=[job], progress={0: 120, 2: 80}, now=_at(11)))
    assert (d.status.rows_delivered, d.status.chunks_left) == (200, 1)
    assert d.status.time_transporting_started == _iso(10)
    # Not listed this time (an operator restart, a failed read): the last count stays.
    same = run(obs(status=d.status, jobs_=[job], progress=None, now=_at(12)))
    assert same.status.rows_delivered == 200
    # An object without rows (a worker of an earlier release) counts 0; chunks beyond num_chunks
    # none; and unverified metadata never makes it more than num_rows.
    assert run(obs(status=st, jobs_=[job], progress={0: 120, 1: None, 7: 50})).status.rows_delivered == 120
    assert run(obs(status=st, jobs_=[job], progress={0: 10**12})).status.rows_delivered == 300
    # A listing that finds less (an object deleted by hand) takes nothing back.
    assert run(obs(status=d.status, jobs_=[job], progress={0: 120})).status.rows_delivered == 200
    # Worker 1 completed chunk 1 before its object was listed: chunks_left knows, the rows lag.
    one_done = replace(job, completed_indexes="1", active=1, ready=1)
    lag = run(obs(status=d.status, jobs_=[one_done], progress={0: 120, 2: 80}, now=_at(13)))
    assert (lag.status.chunks_left, lag.status.rows_delivered) == (0, 200)

    done = replace(job, complete=True, completed_indexes="0-1", active=0, ready=0)
    end = run(obs(status=lag.status, jobs_=[done], now=_at(20)))
    st = end.status
    assert (st.status, st.rows_delivered, st.num_rows, st.chunks_left) == ("completed", 300, 300, 0)
    assert (st.time_staging_started, st.time_transporting_started, st.time_completed) == (_iso(0), _iso(10), _iso(20))
    # finished: nothing moves any more
    kept = run(obs(status=st, jobs_=[done], progress={0: 1}, now=_at(30))).status
    assert (kept.rows_delivered, kept.time_completed) == (300, _iso(20))


def test_one_chunk_per_worker_delivers_its_rows_at_completion():
    """No listing with a chunk per worker (the Job's status gives chunks_left): rows_delivered
    stays at 0 until the Job completes, then is num_rows."""
    st = _transporting_at_10(3, 300)
    job = JobObs(XPORT, child_jobs.TRANSPORT, active=2, ready=2, completed_indexes="0", completions=3)
    d = run(obs(status=st, jobs_=[job], now=_at(11)))
    assert (d.status.chunks_left, d.status.rows_delivered, d.requeue_after) == (2, 0, None)
    done = replace(job, complete=True, completed_indexes="0-2", active=0, ready=0)
    assert run(obs(status=d.status, jobs_=[done], now=_at(12))).status.rows_delivered == 300


def test_the_staging_time_comes_from_the_job_when_the_status_lacks_it():
    """A status written without the time (an operator that died between the create and the
    write, or one from before the field): the staging Job's own creation."""
    st = run(obs()).status
    st.time_staging_started = None
    running = JobObs(STAGE, child_jobs.STAGING, active=1, ready=1, created_at="2026-03-01T11:59:50Z")
    assert run(obs(status=st, jobs_=[running])).status.time_staging_started == "2026-03-01T11:59:50Z"
    # Created suspended: no staging Job, no staging time.
    held = run(obs(spec={**SPEC, "suspend": True}))
    assert not created(held) and held.status.time_staging_started is None


def test_an_empty_window_completes_with_no_rows_delivered_and_no_transport_time():
    st = run(obs()).status
    d = run(obs(status=st, jobs_=[STAGED], pods=[staged_pod(0, 0)], now=_at(10)))
    st = d.status
    assert (st.status, st.num_rows, st.rows_delivered) == ("completed", 0, 0)
    assert (st.time_staging_started, st.time_transporting_started, st.time_completed) == (_iso(0), None, _iso(10))


def test_a_failure_keeps_the_rows_delivered_and_the_times():
    from beam_contract.worker import failure_message

    st = _transporting_at_10(5, 500)
    job = JobObs(
        XPORT,
        child_jobs.TRANSPORT,
        failed=True,
        failed_indexes="1",
        finished_at=_iso(14),
        completions=2,
    )
    pod = PodObs(XPORT, 1, False, 2, failure_message("webhook destination 'hook' chunk 3: HTTP 403", 3), _iso(14))
    d = run(obs(status=st, jobs_=[job], pods=[pod], progress={0: 100, 1: 100}, now=_at(15)))
    st = d.status
    assert (st.status, st.rows_delivered, st.chunks_left) == ("failed", 200, 3)
    assert (st.time_staging_started, st.time_transporting_started, st.time_completed) == (_iso(0), _iso(10), _iso(15))
    # Staging that fails: nothing delivered, never transporting.
    staging = run(obs()).status
    broken = JobObs(STAGE, child_jobs.STAGING, failed=True, failure_reason="BackoffLimitExceeded", finished_at=_iso(1))
    bad = PodObs(STAGE, None, False, 2, "staging: no such table", _iso(1))
    f = run(obs(status=staging, jobs_=[broken], pods=[bad], now=_at(2))).status
    assert (f.status, f.rows_delivered, f.time_transporting_started) == ("failed", None, None)
    assert (f.time_staging_started, f.time_completed) == (_iso(0), _iso(2))


@pytest.mark.parametrize("how", ["cancel", "suspend"])
def test_cancel_and_suspend_keep_the_count_and_the_times(how):
    st = _transporting_at_10(4, 400)
    job = JobObs(XPORT, child_jobs.TRANSPORT, active=2, ready=2, completions=2)
    d = run(obs(status=st, jobs_=[job], progress={0: 100}, spec={**SPEC, how: True}, now=_at(12)))
    assert d.status.status == ("cancelled" if how == "cancel" else "transporting")
    assert (d.status.rows_delivered, d.status.time_transporting_started) == (100, _iso(10))
    assert d.status.time_staging_started == _iso(0)


def test_a_retry_reusing_the_staged_files_keeps_the_count_and_the_times():
    st = _transporting_at_10(4, 400)
    job = JobObs(XPORT, child_jobs.TRANSPORT, active=2, ready=2, completions=2)
    st = run(obs(status=st, jobs_=[job], progress={0: 100, 1: 100}, now=_at(11))).status
    failed_job = replace(job, failed=True, failed_indexes="0", active=1, ready=1, finished_at=_iso(12))
    pod = PodObs(XPORT, 0, False, 2, "webhook destination 'hook' chunk 2: HTTP 500", _iso(12))
    failed = run(obs(status=st, jobs_=[failed_job], pods=[pod], now=_at(13))).status
    assert (failed.status, failed.rows_delivered, failed.time_completed) == ("failed", 200, _iso(13))

    # Retry at NOW+30 min: the last listing (chunks 0, 1) plus what it finds (3 meanwhile).
    d = run(
        replace(
            obs(status=failed, jobs_=[failed_job], spec={**SPEC, "retry": 1}, progress={0: 100, 1: 100, 3: 100}),
            now=_at(30),
            staged=True,
        )
    )
    st = d.status
    assert (st.status, st.attempt, st.rows_delivered, st.num_rows) == ("transporting", 2, 300, 400)
    assert (st.time_staging_started, st.time_transporting_started, st.time_completed) == (_iso(0), _iso(10), None)
    retried_at = next(c.lastTransitionTime for c in st.conditions if c.type == "Failed")
    assert retried_at == _iso(30), "the retry's own start"
    # the new attempt completes: every row
    name = child_jobs.child_job_name("usdc", UID, child_jobs.TRANSPORT, 2)
    done = JobObs(name, child_jobs.TRANSPORT, complete=True, completed_indexes="0-1", completions=2, attempt=2)
    end = run(obs(status=st, jobs_=[failed_job, done], spec={**SPEC, "retry": 1}, now=_at(40))).status
    assert (end.status, end.rows_delivered, end.time_completed) == ("completed", 400, _iso(40))


def test_a_retry_that_stages_again_starts_the_count_and_the_times_over():
    st = _transporting_at_10(4, 400)
    failed = BackfillStatus.model_validate(
        {
            **st.document(),
            "status": "failed",
            "rows_delivered": 200,
            "error_message": "transport failed on chunk 2 of 4: x",
            "time_completed": _iso(13),
        }
    )
    d = run(replace(obs(status=failed, spec={**SPEC, "retry": 1}), now=_at(30), staged=False))
    st = d.status
    assert (st.status, st.num_rows, st.rows_delivered, st.time_transporting_started) == ("staging", None, None, None)
    [job] = created(d)
    assert job["metadata"]["name"] == child_jobs.child_job_name("usdc", UID, child_jobs.STAGING, 2)
    assert st.time_staging_started == _iso(30), "the new staging Job's"
    stage2 = replace(STAGED, name=job["metadata"]["name"], attempt=2)
    moved = run(obs(status=st, jobs_=[stage2], pods=[staged_pod(2, 250, job=stage2.name)], spec={**SPEC, "retry": 1}))
    assert (moved.status.status, moved.status.num_rows, moved.status.rows_delivered) == ("transporting", 250, 0)
    assert moved.status.time_transporting_started == _iso(0)  # NOW, this test's clock


def test_a_progress_objects_rows_metadata_reads_back_and_anything_else_is_none():
    from beam_contract.staging import progress_metadata, rows_of_progress

    assert progress_metadata(1234) == {"rows": "1234"} and rows_of_progress({"rows": "1234"}) == 1234
    assert progress_metadata(None) is None and progress_metadata(-1) is None
    for bad in (None, {}, {"rows": ""}, {"rows": "-5"}, {"rows": "1e9"}, {"rows": "9" * 40}, {"other": "3"}):
        assert rows_of_progress(bad) is None, bad
