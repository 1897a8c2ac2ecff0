"""The status recorder: what a round decided, written to the object's status subresource.

- a write that only moves counters waits until `interval` has passed since the object's last
  write (wait()); the caller writes a transition at once, so a busy object cannot flood the API
  server with status patches;
- a write is a merge patch from the status as last seen to the new one (with_removals): a
  field the new status no longer has is sent as null, which the patch deletes;
- the answer to our own write is cached at once (keep_own()), unless a newer version of the
  object is cached already: the next round must see what we wrote even before the watch
  brings it back, or it would decide (and announce) the same transition twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .. import metrics
from .kube import StatusWriter

Key = tuple[str, str]  # namespace, name


def older(rv: str | None, than: str | None) -> bool:
    """Whether resourceVersion `rv` is older than `than`. Kubernetes calls them opaque, but an
    etcd-backed apiserver's are etcd revisions, integers that only grow (until an etcd restore
    from a backup: restart the operator after one, as every controller should). Anything else
    compares as not older, so the event is taken, as before."""
    try:
        return int(rv) < int(than)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def clean(d: dict[str, Any]) -> dict[str, Any]:
    # A JSON merge patch deletes keys set to null, so the stored status has no nulls: compare
    # without them or every round would look like a change.
    return {k: v for k, v in d.items() if v is not None}


def with_removals(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns status `old` into `new`: a field `new` no longer has (a retry
    clears error_message and time_completed) is sent as null, which the patch deletes."""
    return {**new, **{k: None for k in old if k not in new}}


class StatusRecorder:
    """Status writes of objects by (namespace, name). `cached(key)` is the object as the caller
    caches it (None if it does not), `keep(key, body)` replaces it there."""

    def __init__(
        self,
        api: StatusWriter,
        interval: float,
        cached: Callable[[Key], dict[str, Any] | None],
        keep: Callable[[Key, dict[str, Any]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self.interval = interval
        self._cached, self._keep = cached, keep
        self._clock = clock
        self._last: dict[Key, float] = {}  # when each object's status was last written

    @staticmethod
    def changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
        return new != clean(old)

    def wait(self, key: Key) -> float:
        """Seconds until a write that only moves counters may go; 0 or less: now."""
        return self._last.get(key, 0.0) + self.interval - self._clock()

    async def write(self, key: Key, old: dict[str, Any], new: dict[str, Any]) -> None:
        patched = await self._api.patch_status(key[0], key[1], with_removals(new, old))
        self._last[key] = self._clock()
        metrics.STATUS_WRITES.inc()
        if patched is not None:
            self.keep_own(key, patched)

    def keep_own(self, key: Key, body: dict[str, Any]) -> None:
        """The answer to our own write, unless a newer version of the object is cached already
        (a watch event, or a write sent at the same time whose answer came first), or none is
        (the object is gone)."""
        cached = self._cached(key)
        if cached is not None and not older(
            body["metadata"].get("resourceVersion"), cached["metadata"].get("resourceVersion")
        ):
            self._keep(key, body)

    def forget(self, key: Key) -> None:
        self._last.pop(key, None)
