"""The keyed work queue (beam_operator.runtime.queue) on its own: no Controller, no cluster.

What the controller relies on: a key is never handed to two workers at once, events for a
queued key coalesce, delayed keys come out in due order from one heap, new keys go first, and
a failing key backs off.
"""

from __future__ import annotations

import asyncio

import pytest

from beam_operator.runtime.queue import RETRY_FIRST_S, RETRY_MAX_S, WorkQueue


def _take(q: WorkQueue, n: int, timeout: float = 1.0) -> list:
    async def take() -> list:
        return [await asyncio.wait_for(q.get(), timeout) for _ in range(n)]

    return asyncio.run(take())


def test_events_for_a_queued_key_coalesce_into_one_round():
    q: WorkQueue[str] = WorkQueue()
    for _ in range(3):
        q.add("a")
    q.add("b")
    assert _take(q, 2) == ["a", "b"]
    with pytest.raises(TimeoutError):
        _take(q, 1, timeout=0.05)  # no second "a"


def test_an_earlier_due_time_replaces_a_later_one_and_never_the_reverse():
    now = [100.0]
    q: WorkQueue[str] = WorkQueue(clock=lambda: now[0])
    q.add("a", 30.0)
    q.add("a", 5.0)
    assert q._due["a"] == 105.0
    q.add("a", 60.0)
    assert q._due["a"] == 105.0


def test_delayed_keys_come_out_in_due_order():
    q: WorkQueue[str] = WorkQueue()
    q.add("late", 0.06)
    q.add("soon", 0.02)
    q.add("now")
    q.add("middle", 0.04)
    assert _take(q, 4) == ["now", "soon", "middle", "late"]


def test_new_keys_go_before_due_work_under_way():
    new = {"n1", "n2"}
    q: WorkQueue[str] = WorkQueue(is_new=lambda key: key in new)
    for key in ("o1", "n1", "o2", "n2", "o3"):
        q.add(key)
    assert _take(q, 5) == ["n1", "n2", "o1", "o2", "o3"]


def test_a_busy_key_waits_for_its_worker_and_then_comes_back_once():
    async def run() -> list[str]:
        q: WorkQueue[str] = WorkQueue()
        q.add("a")
        assert await q.get() == "a"  # a worker has it
        q.add("a")
        q.add("a")
        q.add("b")
        assert await asyncio.wait_for(q.get(), 1) == "b"  # "a" is set aside, not handed out
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(q.get(), 0.05)
        q.done("a")  # its worker is done: due again, once
        out = [await asyncio.wait_for(q.get(), 1)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(q.get(), 0.05)
        return out

    assert asyncio.run(run()) == ["a"]


def test_no_key_is_ever_processed_by_two_workers_at_once():
    async def run() -> tuple[dict[str, int], int, int]:
        q: WorkQueue[str] = WorkQueue()
        running: dict[str, int] = {}
        most = 0
        rounds = 0

        async def worker() -> None:
            nonlocal most, rounds
            while True:
                key = await q.get()
                running[key] = running.get(key, 0) + 1
                most = max(most, running[key])
                await asyncio.sleep(0.001)
                running[key] -= 1
                rounds += 1
                q.done(key)

        workers = [asyncio.create_task(worker()) for _ in range(8)]
        for i in range(300):
            q.add(f"k{i % 3}")
            if i % 10 == 0:
                await asyncio.sleep(0.001)
        await asyncio.sleep(0.1)
        for w in workers:
            w.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        return running, most, rounds

    running, most, rounds = asyncio.run(run())
    assert most == 1
    assert 3 <= rounds < 300  # coalesced: far fewer rounds than events


def test_a_failing_key_backs_off_doubling_and_a_success_resets_it():
    now = [0.0]
    q: WorkQueue[str] = WorkQueue(clock=lambda: now[0])
    assert q.retry("a") == (1, RETRY_FIRST_S)
    assert q._due["a"] == RETRY_FIRST_S
    del q._due["a"]
    assert q.retry("a") == (2, 2 * RETRY_FIRST_S)
    for _ in range(20):
        n, delay = q.retry("a")
    assert delay == RETRY_MAX_S
    q.forget("a")
    assert q.retry("a") == (1, RETRY_FIRST_S)


def test_depth_counts_queued_keys():
    q: WorkQueue[str] = WorkQueue()
    assert len(q) == 0
    q.add("a")
    q.add("b", 60)
    assert len(q) == 2
