"""What the controller reads besides its watches, and how often, without a cluster: waiting Pods
(one list per namespace for all its backfills) and the transport workers' progress objects
(bounded per backfill and in all).

The API and the bucket here are recorders (one unit's logic); the same paths on a real node are
tests/e2e/test_backfill_e2e.py (a worker no node can fit, a quota that refuses Pods, chunks_left
counting down while one worker delivers every chunk)."""

from __future__ import annotations

import asyncio
from typing import Any

from beam_operator import controller as controller_module
from beam_operator.config import OperatorConfig
from beam_operator.controller import FINALIZER, Controller
from beam_operator.observe import JobObs, WaitingPod

SPEC = {
    "job_name": "seed",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {"partition_key": "block", "start": 0, "end": 4},
    "destinations": [{"type": "kafka", "name": "t"}],
}
OLD = "2026-01-01T00:00:00Z"  # long before now: every Job is past stuck_pod_seconds


class CountingApi:
    def __init__(self) -> None:
        self.lists: list[str] = []
        self.events: list[str] = []
        self.waiting: dict[str, list[WaitingPod]] = {}

    async def pending_pods(self, namespace: str) -> dict[str, list[WaitingPod]]:
        self.lists.append(namespace)
        await asyncio.sleep(0.01)  # the reconciles of the same moment arrive while it is in flight
        return self.waiting

    async def failed_create(self, namespace: str, job: JobObs) -> list[WaitingPod]:
        self.events.append(job.name)
        return []


def _backfill(ctl: Controller, ns: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
    body = {
        "metadata": {"namespace": ns, "name": name, "uid": f"uid-{ns}-{name}", "finalizers": [FINALIZER]},
        "spec": SPEC,
        "status": status,
    }
    ctl.on_backfill("ADDED", body)
    return body


def _job(ctl: Controller, body: dict[str, Any], kind: str, **spec_status: Any) -> None:
    meta = body["metadata"]
    ctl.on_job(
        "ADDED",
        {
            "metadata": {
                "name": f"{meta['name']}-{kind}",
                "namespace": meta["namespace"],
                "ownerReferences": [{"kind": "BeamBackfill", "uid": meta["uid"], "controller": True}],
                "creationTimestamp": OLD,
                "labels": {"beam-backfill.dev/job-id": meta["uid"], "beam-backfill.dev/phase": kind},
            },
            "spec": {"completions": spec_status.pop("completions", 1)},
            "status": spec_status,
        },
    )


def test_backfills_of_a_namespace_share_one_list_of_waiting_pods():
    api = CountingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    bodies = [_backfill(ctl, ns, f"b{i}", {"status": "staging"}) for ns in ("org-a", "org-b") for i in range(5)]
    for body in bodies:
        _job(ctl, body, "staging", active=1, ready=0)
    api.waiting = {
        "b0-staging": [WaitingPod("b0-staging", "b0-staging-x", "Unschedulable", "0/1 nodes are available", OLD)]
    }

    async def run() -> None:
        await asyncio.gather(*(ctl.observer.read_waiting(b) for b in bodies))

    asyncio.run(run())
    assert sorted(api.lists) == ["org-a", "org-b"], "one list per namespace, not one per backfill"
    # each backfill got what its own Job waits for, from the shared list
    assert [w.pod for w in ctl.backfills[("org-a", "b0")].waiting[1]] == ["b0-staging-x"]
    assert ctl.backfills[("org-a", "b1")].waiting[1] == ()
    # A Job whose Pods do not exist at all (active 0) asks for its FailedCreate Event, alone.
    lone = _backfill(ctl, "org-c", "q", {"status": "staging"})
    _job(ctl, lone, "staging", active=0, ready=0)
    asyncio.run(ctl.observer.read_waiting(lone))
    assert api.events == ["q-staging"] and api.lists[-1] == "org-c"


def test_progress_is_read_only_while_workers_share_chunks_and_within_the_overall_rate(monkeypatch):
    reads: list[str] = []
    monkeypatch.setattr(
        controller_module.staged_files,
        "chunks_with_progress",
        lambda uri, timeout: reads.append(uri) or {0: 100, 2: None},
    )
    config = OperatorConfig(progress_interval_seconds=1.0, progress_reads_per_second=2.0)
    ctl = Controller(config, api=CountingApi(), workers=4)  # type: ignore[arg-type]
    transporting = {"status": "transporting", "num_chunks": 6, "chunks_left": 6}
    shared = [_backfill(ctl, "org", f"s{i}", transporting) for i in range(4)]
    for body in shared:
        _job(ctl, body, "transport", active=2, ready=2, completions=2)  # 2 workers, 6 chunks
    alone = _backfill(ctl, "org", "one-each", {**transporting, "num_chunks": 2})
    _job(ctl, alone, "transport", active=2, ready=2, completions=2)  # a chunk per worker

    async def run() -> None:
        for body in [*shared, alone]:
            await ctl.observer.read_progress(body)
        for body in shared:  # again at once: each is within its interval
            await ctl.observer.read_progress(body)

    asyncio.run(run())
    assert len(reads) == 4, "each sharing backfill read once; the one with a chunk per worker never"
    assert ctl.observer.observed(shared[0]).progress == {0: 100, 2: None}, "each chunk with the rows its object names"
    assert ctl.observer.observed(alone).progress is None
    # 4 backfills reading at 2 per second in all: the last one waits 2 s, not 1 s, for its next read.
    due = sorted(b.progress[0] for b in ctl.backfills.values() if b.progress)
    assert due[-1] - due[0] >= 1.0
    # Staging again (a retry without staged files): what was read is dropped, not counted for
    # the chunks staged anew.
    shared[0]["status"] = {"status": "staging", "attempt": 2}
    asyncio.run(ctl.observer.read_progress(shared[0]))
    assert ctl.observer.observed(shared[0]).progress is None and len(reads) == 4


def test_only_jobs_owned_by_the_backfill_in_its_namespace_count():
    """A Job is the backfill's only with its ownerReference and in its namespace; the label
    alone (anyone's to write, and the uid is in webhook bodies) is not enough."""
    ctl = Controller(OperatorConfig(), api=CountingApi())  # type: ignore[arg-type]
    body = _backfill(ctl, "org-a", "bf", {"status": "staging"})
    uid = body["metadata"]["uid"]
    labels = {"beam-backfill.dev/job-id": uid, "beam-backfill.dev/phase": "staging"}
    owner = [{"kind": "BeamBackfill", "uid": uid, "controller": True}]
    failed = {"conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]}
    decoys = [
        {"name": "bf-staging", "namespace": "org-b", "labels": labels, "ownerReferences": owner},
        {"name": "bf-staging", "namespace": "org-a", "labels": labels},
        {"name": "x", "namespace": "org-a", "labels": labels, "ownerReferences": [{**owner[0], "kind": "Job"}]},
    ]
    for meta in decoys:
        ctl.on_job("ADDED", {"metadata": meta, "status": failed})
    assert ctl.observer.observed(body).jobs == ()
    _job(ctl, body, "staging")
    assert [j.name for j in ctl.observer.observed(body).jobs] == ["bf-staging"]
