"""The controller's work queue: order, coalescing and busy keys, without a cluster.

No API call is made here: only the Controller's queue (runtime.queue.WorkQueue) runs, on caches filled by hand.
"""

from __future__ import annotations

import asyncio

from beam_operator.config import OperatorConfig
from beam_operator.controller import Controller


def _controller() -> Controller:
    return Controller(OperatorConfig(), api=None, workers=1)  # type: ignore[arg-type]


def _backfill(ctl: Controller, name: str, status: str | None) -> tuple[str, str]:
    body = {"metadata": {"namespace": "ns", "name": name, "uid": f"uid-{name}"}, "spec": {}}
    if status:
        body["status"] = {"status": status}
    ctl.on_backfill("ADDED", body)
    return ("ns", name)


def _drain(ctl: Controller, n: int) -> list[str]:
    async def take() -> list[str]:
        return [(await asyncio.wait_for(ctl.queue.get(), 1))[1] for _ in range(n)]

    return asyncio.run(take())


def test_new_backfills_go_before_work_under_way():
    ctl = _controller()
    # Arrival order: two under way, then two new, then one more under way.
    _backfill(ctl, "old-1", "transporting")
    _backfill(ctl, "old-2", "staging")
    _backfill(ctl, "new-1", None)
    _backfill(ctl, "new-2", None)
    _backfill(ctl, "old-3", "transporting")
    assert _drain(ctl, 5) == ["new-1", "new-2", "old-1", "old-2", "old-3"]


def test_events_for_a_queued_key_coalesce_and_a_busy_key_waits():
    ctl = _controller()
    a = _backfill(ctl, "a", "transporting")
    _backfill(ctl, "b", "transporting")
    ctl.queue.add(a)
    ctl.queue.add(a)  # already due: no second entry
    assert _drain(ctl, 2) == ["a", "b"]
    ctl.queue._busy.add(a)
    ctl.queue.add(a)
    c = _backfill(ctl, "c", "transporting")
    # a is being reconciled: it is set aside (again after its worker ends), c comes out.
    assert _drain(ctl, 1) == ["c"]
    assert a in ctl.queue._again and c not in ctl.queue._due


def test_a_watch_event_older_than_our_own_write_is_not_taken():
    ctl = _controller()
    key = ("ns", "a")
    body = {
        "metadata": {"namespace": "ns", "name": "a", "uid": "uid-a", "resourceVersion": "120"},
        "spec": {},
        "status": {"status": "transporting"},
    }
    ctl.on_backfill("MODIFIED", body)  # as _write_status caches the patch's answer
    stale = {"metadata": {**body["metadata"], "resourceVersion": "117"}, "spec": {}, "status": {"status": "staging"}}
    ctl.on_backfill("MODIFIED", stale)
    assert ctl.backfills[key].body["status"] == {"status": "transporting"}
    newer = {"metadata": {**body["metadata"], "resourceVersion": "121"}, "spec": {}, "status": {"status": "completed"}}
    ctl.on_backfill("MODIFIED", newer)
    assert ctl.backfills[key].body["status"] == {"status": "completed"}
    # Versions that are not integers (not etcd) are never judged older: the event is taken.
    odd = {"metadata": {**body["metadata"], "resourceVersion": "x1"}, "spec": {}, "status": {"status": "failed"}}
    ctl.on_backfill("MODIFIED", odd)
    assert ctl.backfills[key].body["status"] == {"status": "failed"}
