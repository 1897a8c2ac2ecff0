"""The controller's finalizer and deletion path without a cluster: when a finalizer is added, how
often a deleted backfill is read from the apiserver, that it holds no worker while it waits, and
that an expired backfill is deleted once.

The API here is a recorder of calls (one unit's logic); the finalizer calls against the real
apiserver are tests/operator/test_kubeclient.py, and the whole path on a real node is
tests/e2e/test_backfill_e2e.py::test_delete_in_each_phase_leaves_no_jobs_pods_or_staged_files.
"""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import pytest

from beam_operator import controller as controller_module
from beam_operator.config import OperatorConfig
from beam_operator.controller import FINALIZER, Controller
from beam_operator.observe import JobObs

KEY = ("ns", "bf")
SPEC = {
    "job_name": "seed",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {"partition_key": "block", "start": 0, "end": 4},
    "destinations": [{"type": "kafka", "name": "t"}],
}


class RecordingApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, ...]] = []
        self.jobs: list[JobObs] = []
        self.pods_left = 0
        self.delete_answer: dict[str, Any] | None = None
        self.add_answer: dict[str, Any] | None = None
        self.released = True
        self.reading: asyncio.Event | None = None  # when set, live reads wait for it
        self.secrets: list[dict[str, Any]] = []

    async def live_children(self, namespace: str, uid: str) -> tuple[list[JobObs], int]:
        self.calls.append(("live_children", namespace, uid))
        if self.reading is not None:
            await self.reading.wait()
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
        return {**_body("11", finalizers=[FINALIZER]), "status": status}

    async def add_finalizer(self, namespace: str, name: str, finalizers: list[str], rv: str | None):
        self.calls.append(("add_finalizer", name, tuple(finalizers), rv))
        return self.add_answer

    async def remove_finalizer(self, namespace: str, name: str, uid: str, finalizers: list[str], finalizer: str):
        self.calls.append(("remove_finalizer", name, uid, tuple(finalizers), finalizer))
        return self.released

    async def create_config_map(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append(("create_config_map", manifest["metadata"]["name"]))
        return True

    async def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append(("create_job", manifest["metadata"]["name"]))
        return True

    async def create_secret(self, namespace: str, manifest: dict[str, Any]) -> bool:
        self.calls.append(("create_secret", manifest["metadata"]["name"]))
        self.secrets.append(manifest)
        return True

    def __getattr__(self, name: str):
        raise AssertionError(f"unexpected API call {name}")


def _body(rv: str = "10", name: str = "bf", uid: str = "uid-1", **meta: Any) -> dict[str, Any]:
    return {
        "metadata": {"namespace": "ns", "name": name, "uid": uid, "resourceVersion": rv, **meta},
        "spec": {**SPEC, "ttl_seconds_after_finished": 0},
        "status": {"status": "completed", "time_completed": "2026-01-01T00:00:00Z"},
    }


def _job_event(ctl: Controller, name: str, event: str, *, deleting: bool, uid: str = "uid-1") -> None:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "labels": {"beam-backfill.dev/job-id": uid},
        "ownerReferences": [{"kind": "BeamBackfill", "uid": uid, "controller": True}],
    }
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    ctl.on_job(event, {"metadata": meta, "status": {}})


def _deleting_backfill(ctl: Controller, api: RecordingApi, name: str = "bf", uid: str = "uid-1") -> None:
    ctl.on_backfill(
        "MODIFIED", _body(name=name, uid=uid, deletionTimestamp="2026-01-01T00:00:01Z", finalizers=[FINALIZER])
    )
    for job in (f"{name}-staging", f"{name}-transport"):
        _job_event(ctl, job, "ADDED", deleting=False, uid=uid)
    api.jobs = [JobObs(name=f"{name}-staging", kind="staging"), JobObs(name=f"{name}-transport", kind="transport")]


async def _round(ctl: Controller, key=KEY) -> None:
    """What a worker does with a key the queue hands it (its queue's get() takes it off first)."""
    ctl.queue._due.pop(key, None)
    await ctl.process(key)


def _due_in(ctl: Controller, key=KEY) -> float | None:
    due = ctl.queue._due.get(key)
    return None if due is None else due - time.monotonic()


@pytest.fixture
def staged(monkeypatch) -> list[str]:
    deleted: list[str] = []
    monkeypatch.setattr(controller_module.staged_files, "delete_staged", lambda uri, timeout: deleted.append(uri) or 3)
    return deleted


def test_a_deleted_backfill_waits_in_the_queue_for_the_watch_and_only_a_live_read_frees_it(staged):
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    _deleting_backfill(ctl, api)
    assert _due_in(ctl) is not None  # the first sight of its deletion queues a round

    async def run() -> None:
        await _round(ctl)
        # One live read, both Jobs deleted; the round ends, and the next is a recheck away.
        assert [c[0] for c in api.calls] == ["live_children", "delete_job", "delete_job"]
        assert controller_module.FINALIZE_RECHECK_S - 1 < _due_in(ctl) <= controller_module.FINALIZE_RECHECK_S
        # Its Jobs being deleted, and the backfill's own events meanwhile, bring no round forward.
        for name in ("bf-staging", "bf-transport"):
            _job_event(ctl, name, "MODIFIED", deleting=True)
        ctl.on_backfill("MODIFIED", _body("13", deletionTimestamp="2026-01-01T00:00:01Z", finalizers=[FINALIZER]))
        _job_event(ctl, "bf-staging", "DELETED", deleting=True)
        assert _due_in(ctl) > controller_module.FINALIZE_RECHECK_S - 1
        # The watch shows the last one gone: due now. The apiserver agrees: the prefix, then the finalizer.
        _job_event(ctl, "bf-transport", "DELETED", deleting=True)
        assert _due_in(ctl) <= 0
        api.jobs, api.pods_left = [], 0
        await _round(ctl)

    asyncio.run(run())
    assert [c[0] for c in api.calls] == [
        "live_children",
        "delete_job",
        "delete_job",
        "live_children",
        "remove_finalizer",
    ]
    assert api.calls[-1] == ("remove_finalizer", "bf", "uid-1", (FINALIZER,), FINALIZER)
    assert staged == ["gs://beam-backfill-staging/backfills/ns/uid-1/"]
    assert _due_in(ctl) is None


def test_a_deleting_job_is_not_deleted_again_and_an_empty_cache_never_releases_without_a_live_read(staged):
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    # A restarted operator whose Job watch has not listed yet: the apiserver still has a Job.
    ctl.on_backfill("MODIFIED", _body(deletionTimestamp="2026-01-01T00:00:01Z", finalizers=[FINALIZER]))
    api.jobs = [JobObs(name="bf-transport", kind="transport")]
    asyncio.run(_round(ctl))
    assert [c[0] for c in api.calls] == ["live_children", "delete_job"]
    assert 0 < _due_in(ctl) <= 1.0  # the cache shows no Job to wait for: read again in a second
    # The next round: the Job is being deleted (Foreground, its Pods going first).
    api.jobs = [JobObs(name="bf-transport", kind="transport", deleting=True)]
    asyncio.run(_round(ctl))
    assert [c[0] for c in api.calls] == ["live_children", "delete_job", "live_children"]
    assert staged == []


def test_a_finalizer_list_changed_since_seen_is_released_on_the_next_round(staged):
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    ctl.on_backfill("MODIFIED", _body(deletionTimestamp="2026-01-01T00:00:01Z", finalizers=["x/y", FINALIZER]))
    api.released = False  # the JSON patch's test failed (422)
    asyncio.run(_round(ctl))
    assert [c[0] for c in api.calls] == ["live_children", "remove_finalizer"]
    assert 0 < _due_in(ctl) <= 1.0


def test_deletions_beyond_workers_over_four_wait_without_a_worker_and_in_order(staged):
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]  # one at a time
    for n in (1, 2, 3):
        _deleting_backfill(ctl, api, name=f"bf{n}", uid=f"uid-{n}")
    api.jobs = []  # nothing left: each round ends with the prefix and the finalizer

    async def run() -> None:
        api.reading = asyncio.Event()
        first = asyncio.create_task(_round(ctl, ("ns", "bf1")))
        await asyncio.sleep(0.05)
        ctl.queue._due.clear()
        # The others return at once: no API call, no worker held, nothing queued yet.
        await asyncio.wait_for(_round(ctl, ("ns", "bf3")), 1)
        await asyncio.wait_for(_round(ctl, ("ns", "bf2")), 1)
        assert [c[0] for c in api.calls] == ["live_children"] and not ctl.queue._due
        api.reading.set()
        await first
        # The first parked is due once the running one ends.
        assert list(ctl.queue._due) == [("ns", "bf3")]

    asyncio.run(run())
    assert staged == ["gs://beam-backfill-staging/backfills/ns/uid-1/"]


def test_a_new_backfill_gets_the_finalizer_before_any_job_and_nothing_without_it():
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    new = {"metadata": {"namespace": "ns", "name": "bf", "uid": "uid-1", "resourceVersion": "5"}, "spec": SPEC}
    ctl.on_backfill("ADDED", new)
    # A newer version exists (409): nothing is created, the backfill comes back.
    asyncio.run(_round(ctl))
    assert api.calls == [("add_finalizer", "bf", (FINALIZER,), "5")]
    assert 0 < _due_in(ctl) <= 1.0
    api.calls.clear()
    api.add_answer = {**new, "metadata": {**new["metadata"], "resourceVersion": "6", "finalizers": [FINALIZER]}}
    asyncio.run(_round(ctl))
    assert api.calls[0] == ("add_finalizer", "bf", (FINALIZER,), "5")
    made = [c[0] for c in api.calls[1:]]
    assert "create_job" in made and made.index("create_secret") < made.index("create_job")
    # The staged-data key: 32 random bytes, in an immutable Secret the backfill owns.
    [secret] = api.secrets
    assert secret["metadata"]["name"] == "bf-uid-1-staging-key" and secret["immutable"] is True
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    assert len(base64.b64decode(secret["stringData"]["key"])) == 32
    assert ctl.backfills[KEY].body["metadata"]["finalizers"] == [FINALIZER]
    api.calls.clear()
    # Once it has it, no reconcile asks again.
    ctl.on_backfill("MODIFIED", {**api.add_answer, "status": {"status": "staging"}})
    asyncio.run(_round(ctl))
    assert "add_finalizer" not in [c[0] for c in api.calls]


def test_an_expired_backfill_is_deleted_once_even_with_reconciles_queued_before_the_watch_shows_it(staged):
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    ctl.on_backfill("MODIFIED", _body("10", finalizers=[FINALIZER]))
    api.delete_answer = _body("12", deletionTimestamp="2026-01-01T00:00:01Z", finalizers=[FINALIZER])

    async def run() -> None:
        await _round(ctl)
        await _round(ctl)  # e.g. a Job event queued before the deletion's watch event
        await _round(ctl)

    asyncio.run(run())
    deletes = [c for c in api.calls if c[0] == "delete_backfill"]
    # With its uid as precondition: never a newer backfill that took the same name.
    assert deletes == [("delete_backfill", "ns", "bf", "uid-1")]
    assert ctl.backfills[KEY].body["metadata"]["deletionTimestamp"]
    # The reconciles after the delete are clean-up rounds: the prefix went, the finalizer too.
    assert "remove_finalizer" in [c[0] for c in api.calls]
    assert staged == ["gs://beam-backfill-staging/backfills/ns/uid-1/"]
    # The Expired Event was queued once.
    assert sum(q.qsize() for q in ctl.events.lanes) == 1


def test_pods_without_a_job_are_looked_at_every_recheck_not_every_second(staged):
    """A Pod orphaned by its Job (--cascade=orphan) is not watched: waiting for it re-reads the
    backfill every FINALIZE_RECHECK_S, not every second."""
    api = RecordingApi()
    ctl = Controller(OperatorConfig(), api=api, workers=4)  # type: ignore[arg-type]
    ctl.on_backfill("MODIFIED", _body(deletionTimestamp="2026-01-01T00:00:01Z", finalizers=[FINALIZER]))
    api.pods_left = 1
    asyncio.run(_round(ctl))
    assert [c[0] for c in api.calls] == ["live_children"] and staged == []
    assert _due_in(ctl) > controller_module.FINALIZE_RECHECK_S - 1


def test_only_pods_that_could_still_write_hold_the_finalizer():
    from datetime import UTC, datetime, timedelta

    from beam_operator.observe import LOST_POD_S, pod_may_write

    now = datetime(2026, 1, 1, tzinfo=UTC)

    def pod(phase: str, deleting_for: float | None = None) -> dict[str, Any]:
        meta = (
            {} if deleting_for is None else {"deletionTimestamp": (now - timedelta(seconds=deleting_for)).isoformat()}
        )
        return {"metadata": meta, "status": {"phase": phase}}

    assert pod_may_write(pod("Running"), now) and pod_may_write(pod("Pending"), now)
    assert pod_may_write(pod("Running", deleting_for=20), now)  # within its grace period
    assert not pod_may_write(pod("Succeeded"), now) and not pod_may_write(pod("Failed"), now)  # orphans that ended
    assert not pod_may_write(pod("Running", deleting_for=LOST_POD_S + 1), now)  # on a lost node
