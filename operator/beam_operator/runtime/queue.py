"""A keyed work queue, as client-go's workqueue and controller-runtime have one:

- one key is never handed to two workers at once: a key due while a worker has it is set aside
  and queued again when that worker is done (done());
- keys coalesce: a key due already takes no second entry, so events that pile up for one
  object make one round, and an earlier due time replaces a later one;
- no timer or task per key: a delayed re-queue is an entry in one heap, and an entry an earlier
  one has superseded is skipped when it comes up;
- keys that `is_new` says are new go before other due work (get());
- a failed round comes back after a backoff that doubles with each failure in a row
  (retry()), until a round succeeds or the key is forgotten (forget()).
"""

from __future__ import annotations

import asyncio
import heapq
import time
from collections import deque
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# A failed round is retried after 5 s, doubling on each failure in a row up to 5 minutes: the
# apiserver unreachable, 429, 5xx.
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0


class WorkQueue(Generic[K]):
    def __init__(
        self,
        is_new: Callable[[K], bool] = lambda key: False,
        *,
        retry_first: float = RETRY_FIRST_S,
        retry_max: float = RETRY_MAX_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._is_new = is_new
        self._retry_first, self._retry_max = retry_first, retry_max
        self._clock = clock
        self._heap: list[tuple[float, K]] = []
        self._due: dict[K, float] = {}  # each queued key's due time: the one heap entry that counts
        self._ready_new: deque[K] = deque()  # due now, new
        self._ready: deque[K] = deque()  # due now, everything else
        self._busy: set[K] = set()
        self._again: set[K] = set()  # due while busy: queued again once done
        self._failures: dict[K, int] = {}  # failed rounds in a row: the backoff
        self._wake = asyncio.Event()

    def add(self, key: K, delay: float = 0.0) -> None:
        due = self._clock() + delay
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))
        self._wake.set()

    def __len__(self) -> int:
        """The queue's depth as the gauge has always counted it: queued keys, and those due now
        once more (they are in both)."""
        return len(self._due) + len(self._ready) + len(self._ready_new)

    async def get(self) -> K:
        """The next key to work on: due, not busy, a new one before anything else. It is busy
        until done(key).

        New keys go first because their first round is what a user waits for after
        `kubectl apply` (its staging Job), while the rest of the queue is work already under
        way. On a saturated API server a burst of creates otherwise waited behind the Job events
        and completions of earlier backfills (docs/benchmarks.md, "Operator at scale": the table
        "1,000 × 1, burst"). Only a burst of new keys can delay the others, and only while it
        lasts.
        """
        while True:
            now = self._clock()
            while self._heap:
                due, key = self._heap[0]
                if self._due.get(key) != due:
                    heapq.heappop(self._heap)  # superseded by an earlier entry
                    continue
                if due > now:
                    break
                heapq.heappop(self._heap)
                # Still in _due (with a time already past), so that new events coalesce into it.
                (self._ready_new if self._is_new(key) else self._ready).append(key)
            for lane in (self._ready_new, self._ready):
                while lane:
                    key = lane.popleft()
                    del self._due[key]
                    if key in self._busy:
                        self._again.add(key)
                        continue
                    self._busy.add(key)
                    return key
            timeout = (self._heap[0][0] - now) if self._heap else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    def done(self, key: K) -> None:
        """The worker is done with `key`: queued again now if it came due meanwhile."""
        self._busy.discard(key)
        if key in self._again:
            self._again.discard(key)
            self.add(key)

    def retry(self, key: K) -> tuple[int, float]:
        """Queue `key` again after its round failed: the failures in a row, and the delay."""
        n = self._failures[key] = self._failures.get(key, 0) + 1
        delay = min(self._retry_first * 2 ** (n - 1), self._retry_max)
        self.add(key, delay)
        return n, delay

    def forget(self, key: K) -> None:
        """A round of `key` succeeded, or the object is gone: its next failure waits the least."""
        self._failures.pop(key, None)
