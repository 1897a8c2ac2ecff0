"""The status and Event recorders (beam_operator.runtime.status, .events) on their own: no
Controller, no cluster; the API is a recorder of calls."""

from __future__ import annotations

import asyncio
from typing import Any

from beam_operator import metrics
from beam_operator.runtime.events import Event, EventRecorder
from beam_operator.runtime.status import StatusRecorder, clean, older, with_removals

KEY = ("ns", "bf")


def _body(rv: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"metadata": {"namespace": "ns", "name": "bf", "uid": "u", "resourceVersion": rv}, "status": status or {}}


class StatusApi:
    def __init__(self, answer_rv: str | None = "12") -> None:
        self.patches: list[tuple[str, str, dict[str, Any]]] = []
        self.answer_rv = answer_rv

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        self.patches.append((namespace, name, status))
        return None if self.answer_rv is None else _body(self.answer_rv, status)


def _recorder(api: StatusApi, cache: dict, now: list[float], interval: float = 1.0) -> StatusRecorder:
    return StatusRecorder(api, interval, cache.get, cache.__setitem__, clock=lambda: now[0])


def test_a_write_is_a_merge_patch_that_removes_what_the_new_status_lacks():
    assert with_removals({"status": "staging"}, {"status": "failed", "error_message": "x"}) == {
        "status": "staging",
        "error_message": None,
    }
    assert clean({"a": 1, "b": None}) == {"a": 1}
    assert not StatusRecorder.changed({"status": "staging", "num_chunks": None}, {"status": "staging"})
    assert StatusRecorder.changed({"status": "staging"}, {"status": "transporting"})

    api, cache, now = StatusApi(), {KEY: _body("10")}, [100.0]
    asyncio.run(
        _recorder(api, cache, now).write(KEY, {"status": "failed", "error_message": "x"}, {"status": "staging"})
    )
    assert api.patches == [("ns", "bf", {"status": "staging", "error_message": None})]


def test_counters_wait_for_the_interval_since_the_last_write():
    api, cache, now = StatusApi(), {KEY: _body("10")}, [100.0]
    rec = _recorder(api, cache, now, interval=1.0)
    assert rec.wait(KEY) <= 0  # never written: at once
    asyncio.run(rec.write(KEY, {}, {"chunks_left": 3}))
    assert rec.wait(KEY) == 1.0
    now[0] = 100.6
    assert abs(rec.wait(KEY) - 0.4) < 1e-9
    now[0] = 101.0
    assert rec.wait(KEY) <= 0
    assert rec.wait(("ns", "other")) <= 0  # per object
    rec.forget(KEY)
    now[0] = 100.5
    assert rec.wait(KEY) <= 0


def test_the_answer_to_our_own_write_is_cached_unless_a_newer_version_is():
    now = [0.0]
    cache = {KEY: _body("10")}
    asyncio.run(_recorder(StatusApi("12"), cache, now).write(KEY, {}, {"status": "staging"}))
    assert cache[KEY]["metadata"]["resourceVersion"] == "12"
    assert cache[KEY]["status"] == {"status": "staging"}
    # The watch brought a newer version first: ours is older, and not taken.
    cache = {KEY: _body("15")}
    asyncio.run(_recorder(StatusApi("12"), cache, now).write(KEY, {}, {"status": "staging"}))
    assert cache[KEY]["metadata"]["resourceVersion"] == "15"
    # Gone meanwhile (nothing cached, or the apiserver answered 404): nothing comes back.
    cache = {}
    asyncio.run(_recorder(StatusApi("12"), cache, now).write(KEY, {}, {"status": "staging"}))
    asyncio.run(_recorder(StatusApi(None), cache, now).write(KEY, {}, {"status": "staging"}))
    assert cache == {}


def test_resource_versions_compare_as_integers_and_anything_else_as_not_older():
    assert older("117", "120") and not older("121", "120") and not older("120", "120")
    assert not older("x1", "120") and not older(None, "120") and not older("5", None)


class EventApi:
    def __init__(self, fail_on: str = "") -> None:
        self.posted: list[tuple[str, str]] = []
        self.fail_on = fail_on

    async def post_event(self, body: dict[str, Any], ev: Event) -> None:
        await asyncio.sleep(0)
        if ev.reason == self.fail_on:
            raise RuntimeError("not what post_event ever raises")
        self.posted.append((body["metadata"]["name"], ev.reason))


def _ev(reason: str) -> Event:
    return Event("Normal", reason, reason.lower())


def test_events_of_one_object_keep_their_order_and_one_that_fails_does_not_stop_its_lane():
    api = EventApi(fail_on="Bad")

    async def run() -> None:
        events = EventRecorder(api, lanes=3, backlog=300)
        events.start()
        for name in ("a", "b", "c", "d"):
            body = _body("1")
            body["metadata"]["name"] = name
            for reason in ("Staging", "Bad", "Transporting", "Completed"):
                assert events.record(("ns", name), body, _ev(reason))
        await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in events.lanes)), 5)
        await events.stop()

    asyncio.run(run())
    for name in ("a", "b", "c", "d"):
        assert [r for n, r in api.posted if n == name] == ["Staging", "Transporting", "Completed"]


def test_a_full_lane_drops_the_event_and_counts_it():
    api = EventApi()
    dropped = metrics.EVENTS_DROPPED._value.get()

    async def run() -> list[bool]:
        events = EventRecorder(api, lanes=2, backlog=2)  # one Event per lane
        # Not started: nothing takes Events off the lanes, so the second of one key finds it full.
        taken = [events.record(KEY, _body("1"), _ev("Staging")), events.record(KEY, _body("1"), _ev("Transporting"))]
        events.start()
        await asyncio.wait_for(asyncio.gather(*(lane.join() for lane in events.lanes)), 5)
        await events.stop()
        return taken

    assert asyncio.run(run()) == [True, False]
    assert api.posted == [("bf", "Staging")]
    assert metrics.EVENTS_DROPPED._value.get() == dropped + 1
