"""The controller's deletion path without a cluster: how often a finalizer reads the apiserver,
and that an expired backfill is deleted once.

The API here is a recorder of calls (one unit's logic); the finalizer against a real apiserver
and node is tests/e2e/test_backfill_e2e.py::test_delete_in_each_phase_leaves_no_jobs_pods_or_staged_files.
"""

from __future__ import annotations

import asyncio
from typing import Any

from beam_operator import controller as controller_module
from beam_operator.config import OperatorConfig
from beam_operator.controller import Controller
from beam_operator.reconcile import JobObs


class RecordingApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.jobs: list[JobObs] = []
        self.pods_left = 0
        self.delete_answer: dict[str, Any] | None = None

    async def live_children(self, namespace: str, uid: str) -> tuple[list[JobObs], int]:
        self.calls.append(("live_children", namespace, uid))
        return list(self.jobs), self.pods_left

    async def delete_job(self, namespace: str, name: str) -> None:
        self.calls.append(("delete_job", namespace, name))

    async def delete_backfill(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
        self.calls.append(("delete_backfill", namespace, name, uid))
        await asyncio.sleep(0)  # the status write, sent at the same time, is answered first
        return self.delete_answer

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("patch_status", namespace, name))
        await asyncio.sleep(0.01)  # ...or last: its older version must not replace the deletion's
        return {**_body("11"), "status": status}

    def __getattr__(self, name: str):
        raise AssertionError(f"unexpected API call {name}")


def _body(rv: str = "10", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": "bf", "uid": "uid-1", "resourceVersion": rv, **meta},
        "spec": {"ttl_seconds_after_finished": 0},
        "status": {"status": "completed", "time_completed": "2026-01-01T00:00:00Z"},
    }


def _job_event(ctl: Controller, name: str, event: str, *, deleting: bool) -> None:
    meta: dict[str, Any] = {"name": name, "labels": {"beam-backfill.dev/job-id": "uid-1"}}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctl.on_job(event, {"metadata": meta, "status": {}})


def _deleting_backfill(ctl: Controller, api: RecordingApi) -> dict[str, Any]:
    body = _body(deletionTimestamp="2026-01-01T00:00:01Z")
    ctl.on_backfill("MODIFIED", body)
    for name in ("bf-staging", "bf-transport"):
        _job_event(ctl, name, "ADDED", deleting=False)
    api.jobs = [JobObs(name="bf-staging", phase="staging"), JobObs(name="bf-transport", phase="transport")]
    return body


def test_a_finalizer_reads_again_when_the_watch_shows_its_jobs_gone_and_only_a_live_read_frees_it(monkeypatch):
    deleted: list[str] = []
    monkeypatch.setattr(controller_module.staged_files, "delete_staged", lambda uri, timeout: deleted.append(uri) or 3)
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    body = _deleting_backfill(ctl, api)

    async def run() -> bool:
        handler = asyncio.create_task(ctl.finalize(body))
        await asyncio.sleep(0.3)  # kopf's old 1 s retry would not have come yet either: see the next test
        # One live read, both Jobs deleted, and then the handler waits on the watch: no reads.
        assert [c[0] for c in api.calls] == ["live_children", "delete_job", "delete_job"]
        for name in ("bf-staging", "bf-transport"):
            _job_event(ctl, name, "MODIFIED", deleting=True)
        await asyncio.sleep(0.3)
        assert len(api.calls) == 3 and not handler.done()
        # The watch shows them gone; the apiserver agrees: one more read, the prefix goes, done.
        api.jobs, api.pods_left = [], 0
        _job_event(ctl, "bf-staging", "DELETED", deleting=True)
        _job_event(ctl, "bf-transport", "DELETED", deleting=True)
        return await asyncio.wait_for(handler, 2)

    assert asyncio.run(run()) is True
    assert [c[0] for c in api.calls] == ["live_children", "delete_job", "delete_job", "live_children"]
    assert deleted == ["gs://beam-backfill-staging/backfills/ns/uid-1/"]


def test_a_missed_deleted_costs_a_read_each_recheck_and_the_handler_hands_back_to_kopf(monkeypatch):
    monkeypatch.setattr(controller_module, "FINALIZE_RECHECK_S", 0.05)
    monkeypatch.setattr(controller_module, "FINALIZE_HOLD_S", 0.5)
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    body = _deleting_backfill(ctl, api)
    for name in ("bf-staging", "bf-transport"):
        _job_event(ctl, name, "MODIFIED", deleting=True)
    # The apiserver still has one Job, being deleted; the watch never says it went.
    api.jobs = [JobObs(name="bf-staging", phase="staging", deleting=True)]
    assert asyncio.run(asyncio.wait_for(ctl.finalize(body), 5)) is False
    reads = [c for c in api.calls if c[0] == "live_children"]
    assert 3 <= len(reads) <= 12, len(reads)  # every 0.05 s for 0.5 s, not as fast as it can
    assert not [c for c in api.calls if c[0] == "delete_job"]  # never a second delete of a deleting Job


def test_an_empty_cache_never_releases_a_finalizer_without_a_live_read(monkeypatch):
    monkeypatch.setattr(controller_module, "FINALIZE_HOLD_S", 0.0)
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    body = _body(deletionTimestamp="2026-01-01T00:00:01Z")
    # A restarted operator whose Job watch has not listed yet: the apiserver still has a Job.
    api.jobs = [JobObs(name="bf-transport", phase="transport")]
    assert not asyncio.run(ctl.finalize(body))
    assert [c[0] for c in api.calls] == ["live_children", "delete_job"]


def test_an_expired_backfill_is_deleted_once_even_with_reconciles_queued_before_the_watch_shows_it():
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    ctl.on_backfill("MODIFIED", _body("10"))
    api.delete_answer = _body("12", deletionTimestamp="2026-01-01T00:00:01Z", finalizers=["beam-backfill.dev/cleanup"])
    key = ("ns", "bf")

    async def run() -> None:
        await ctl.process(key)
        await ctl.process(key)  # e.g. a Job event queued before the deletion's watch event
        await ctl.process(key)

    asyncio.run(run())
    deletes = [c for c in api.calls if c[0] == "delete_backfill"]
    # With its uid as precondition: never a newer backfill that took the same name.
    assert deletes == [("delete_backfill", "ns", "bf", "uid-1")]
    assert ctl.caches.backfills[key]["metadata"]["deletionTimestamp"]
    # The Expired Event was queued once.
    assert sum(q.qsize() for q in ctl._events) == 1
