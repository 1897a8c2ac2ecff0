"""Kubernetes Events, posted off the workers' path.

Events are for people reading `kubectl describe`; nothing waits on them, so a worker only
queues one (record()) and goes on: posted on the worker's path, they were a large part of a new
backfill's first round (docs/benchmarks.md, "Earlier figures behind the operator's settings"). They go through a few lanes, one asyncio task each with a bounded
queue, an object always in the same lane so that its Events keep their order. A full lane drops
the Event, with a log line and beam_events_dropped_total: a stuck apiserver must not grow the
operator's memory.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

from beam_contract import logs

from .. import metrics
from .kube import EventPoster

log = logging.getLogger("beam_operator.controller")

# What an Event keeps of its message (kubeclient.KubeApi.post_event cuts it there); what a
# WorkerLog Event quotes of a failed worker's last lines fits in it (reconcile.py).
MAX_EVENT_MESSAGE = 1024


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


def event_lanes(workers: int) -> int:
    return max(1, workers // 4)


class EventRecorder:
    """Events of objects (their bodies: namespace, name, uid) through `lanes` lanes that hold
    `backlog` Events in all. The queues exist from here on (no loop needed), their consumers
    from start()."""

    def __init__(self, api: EventPoster, lanes: int, backlog: int) -> None:
        self._api = api
        self.lanes: list[asyncio.Queue[tuple[dict[str, Any], Event]]] = [
            asyncio.Queue(maxsize=max(1, -(-backlog // lanes))) for _ in range(lanes)
        ]
        self._tasks: list[asyncio.Task] = []

    def record(self, key: Hashable, body: dict[str, Any], ev: Event) -> bool:
        """Queue `ev` in the lane of `key`; False if that lane is full and the Event dropped."""
        lane = self.lanes[hash(key) % len(self.lanes)]
        try:
            lane.put_nowait((body, ev))
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.inc()
            meta = body["metadata"]
            log.warning(
                "%s/%s: Event %s not recorded: %d Events already wait for the API server",
                meta["namespace"],
                meta["name"],
                ev.reason,
                lane.qsize(),
            )
            return False
        return True

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._post_lane(lane)) for lane in self.lanes]

    async def stop(self) -> None:
        """Stop the lanes; Events still queued are dropped."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _post_lane(self, lane: asyncio.Queue[tuple[dict[str, Any], Event]]) -> None:
        while True:
            body, ev = await lane.get()
            meta = body["metadata"]
            try:
                with logs.backfill_context(namespace=meta["namespace"], name=meta["name"], job_id=meta.get("uid")):
                    await self._post_one(body, ev)
            finally:
                lane.task_done()
                # Not held while the lane waits for the next one: the last object it posted for
                # would stay in memory after its deletion (docs/benchmarks.md, "Finished
                # backfills expiring": a census found one body per lane).
                del body, ev, meta

    async def _post_one(self, body: dict[str, Any], ev: Event) -> None:
        try:
            await self._api.post_event(body, ev)  # logs the API's refusals: an Event is not retried
        except Exception:  # anything else must not end the lane, or its Events pile up unposted
            log.exception("could not record event %s", ev.reason)
