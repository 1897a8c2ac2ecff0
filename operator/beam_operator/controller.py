"""The controller loop: watch caches in, reconcile() per backfill, actions and status out.

kopf delivers watch events (handlers.py); this module keeps what they say in memory and runs
reconcile() for each backfill through a keyed work queue, as controller-runtime does:
- one key per backfill, never processed by two workers at once, coalesced when events pile up;
- a status write at most every `status_interval_seconds` per backfill while it only counts down
  (phase transitions are written at once), so a busy transport Job cannot flood the API server;
- no timers or daemons per object: a delayed re-queue is an entry in one heap;
- a new backfill's first reconcile goes before other due work (_next), as what a user waits for;
- API calls are coroutines on the event loop (kubeclient.KubeApi, one aiohttp session with a
  bounded connection pool): a worker awaits them, no thread per request, and the pool's size
  bounds the requests in flight (docs/operations.md);
- Events go through a few lanes, one asyncio task each with a bounded queue, a backfill always
  in the same lane so that its Events keep their order; a full lane drops the Event (a log line
  and beam_events_dropped_total): Events are for people, and a stuck apiserver must not grow
  the operator's memory;
- the staged files' deletion (google-cloud-storage, blocking) runs in a thread, once per
  finished backfill;
- Pods are not watched: a backfill needs a Pod only for what its worker said once its Job
  has finished (the staging result, a failure message), so the Pods of that one Job are read
  then. A watch would send every Pod of every transport Job (20,000 for 1,000 backfills of
  20 chunks), and kopf keeps memory per watched object until it is deleted.
"""

from __future__ import annotations

import asyncio
import base64
import heapq
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import orjson

from beam_contract import logs
from beam_contract.model import GROUP, TERMINAL, BackfillStatus, Phase, parse_timestamp

from . import child_jobs, leader, metrics, staged_files
from .config import OperatorConfig
from .kubeclient import ApiError
from .reconcile import (
    TRANSITION_REASONS,
    Action,
    CreateJob,
    DeleteBackfill,
    DeleteJob,
    DeleteStaged,
    Event,
    JobObs,
    Observed,
    PodObs,
    SuspendJob,
    WaitingPod,
    current_jobs,
    finalize_actions,
    reconcile,
    running,
    stuck_recheck_after,
    wants_retry,
    workers_share_chunks,
)

if TYPE_CHECKING:
    from .kubeclient import KubeApi

log = logging.getLogger("beam_operator.controller")

Key = tuple[str, str]  # namespace, name

# What a Job create answers when asking again cannot help: a bad or invalid manifest, a
# ResourceQuota or an admission policy that forbids it, a namespace that is gone.
PERMANENT_REFUSALS = frozenset({400, 403, 404, 422})
# A reconcile that raised (the apiserver unreachable, 429, 5xx) is retried after 5 s, doubling
# on each failure in a row up to 5 minutes.
RETRY_FIRST_S, RETRY_MAX_S = 5.0, 300.0
# What holds a deleted backfill until its Jobs, Pods and staged files are gone. The controller
# adds and removes it itself (_add_finalizer, _finalize_step), not kopf: see handlers.py.
FINALIZER = f"{GROUP}/cleanup"
# A deleted backfill's Jobs and Pods are read again when the watch shows its last Job gone, or
# after this long in case the watch missed a DELETED.
FINALIZE_RECHECK_S = 10.0
# How long one list of a namespace's waiting worker Pods serves its backfills' stuck-Pod checks.
PENDING_PODS_TTL_S = 5.0


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    # A JSON merge patch deletes keys set to null, so the stored status has no nulls: compare
    # without them or every reconcile would look like a change.
    return {k: v for k, v in d.items() if v is not None}


def _with_removals(new: dict[str, Any], old: dict[str, Any]) -> dict[str, Any]:
    """The merge patch that turns status `old` into `new`: a field `new` no longer has (a retry
    clears error_message and time_completed) is sent as null, which the patch deletes."""
    return {**new, **{k: None for k in old if k not in new}}


_KEPT_METADATA = (
    "name",
    "namespace",
    "uid",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "resourceVersion",
    "finalizers",
)
_KEPT_LABELS = (child_jobs.QUEUE_NAME_LABEL,)


# Cached metadata of our own (never written anywhere): the spec's size as JSON, and whether the
# cached spec holds only the first of its filter values (process() reads the whole spec again
# before it builds a Job from it).
SPEC_BYTES = "beam/spec-bytes"
SLIMMED = "beam/filter-slimmed"
SLIM_FILTER_BYTES = 4096


def _slim(body: dict[str, Any]) -> dict[str, Any]:
    """What reconcile() and the Events read of a BeamBackfill, nothing more.

    A full body carries managedFields (one entry per writer) and kopf's annotations (a copy of
    the spec): kilobytes of JSON, ten times that as Python objects, times every backfill. A
    filter of thousands of values is kept as its first value only: reconcile() needs all of them
    only to build a Job, and then process() reads them again, so that the memory a cached
    backfill costs does not grow with its filter (issue 25).
    """
    meta = body["metadata"]
    kept = {k: meta[k] for k in _KEPT_METADATA if k in meta}
    if labels := {k: v for k, v in (meta.get("labels") or {}).items() if k in _KEPT_LABELS}:
        kept["labels"] = labels
    spec = body.get("spec") or {}
    kept[SPEC_BYTES] = meta.get(SPEC_BYTES) or len(orjson.dumps(spec))
    values = (spec.get("filter") or {}).get("values") or []
    if meta.get(SLIMMED) or sum(len(str(v)) for v in values) > SLIM_FILTER_BYTES:
        kept[SLIMMED] = True
        if len(values) > 1:
            spec = {**spec, "filter": {**spec["filter"], "values": values[:1]}}
    return {"metadata": kept, "spec": spec, "status": body.get("status") or {}}


def _older(rv: str | None, than: str | None) -> bool:
    """Whether resourceVersion `rv` is older than `than`. Kubernetes calls them opaque, but an
    etcd-backed apiserver's are etcd revisions, integers that only grow (until an etcd restore
    from a backup: restart the operator after one, as every controller should). Anything else
    compares as not older, so the event is taken, as before."""
    try:
        return int(rv) < int(than)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


@dataclass
class Caches:
    backfills: dict[Key, dict[str, Any]] = field(default_factory=dict)
    # By (namespace, owner uid), then Job name: a Job counts only in its owner's namespace.
    jobs: dict[tuple[str, str], dict[str, JobObs]] = field(default_factory=dict)
    pods: dict[str, dict[str, PodObs]] = field(default_factory=dict)  # by owner uid, then Pod name
    keys_by_uid: dict[str, Key] = field(default_factory=dict)
    # Stuck Pods of running Jobs, and when to look for them again (monotonic), by owner uid.
    waiting: dict[str, tuple[float, tuple[WaitingPod, ...]]] = field(default_factory=dict)
    # Chunks with a progress object in the bucket, each with the rows its metadata names, and
    # when to read again (monotonic), by owner uid: only while transport workers have more than
    # one chunk each (_read_progress).
    progress: dict[str, tuple[float, dict[int, int | None]]] = field(default_factory=dict)


DESTINATION_TYPES = ("kafka", "webhook", "nats", "sns")


def _destination_types(body: dict[str, Any]) -> dict[str, int]:
    """How many destinations of each type the backfill's spec names."""
    out: dict[str, int] = {}
    for d in (body.get("spec") or {}).get("destinations") or []:
        if d.get("type") in DESTINATION_TYPES:
            out[d["type"]] = out.get(d["type"], 0) + 1
    return out


def api_connections(workers: int) -> int:
    """The default bound of the API session: a reconcile sends its Job create and its status
    write together (two per worker), plus one per Event lane."""
    return 2 * workers + event_lanes(workers)


def event_lanes(workers: int) -> int:
    return max(1, workers // 4)


class Controller:
    def __init__(self, config: OperatorConfig, api: KubeApi, *, workers: int = 4, event_backlog: int = 1000) -> None:
        self.config = config
        self.api = api
        self.workers = workers
        self.caches = Caches()
        self._heap: list[tuple[float, Key]] = []
        self._due: dict[Key, float] = {}
        self._ready_new: deque[Key] = deque()  # due now, first sight of a backfill
        self._ready: deque[Key] = deque()  # due now, everything else
        self._busy: set[Key] = set()
        self._again: set[Key] = set()
        self._wake = asyncio.Event()
        self._last_write: dict[Key, float] = {}
        # When each backfill last moved (a status change or a chunk delivered): the stall gauge.
        self._progress_at: dict[Key, float] = {}
        # Job creates the apiserver refused for good, by backfill uid and Job kind: the next
        # reconcile ends the backfill `failed` with the apiserver's reason.
        self._refused: dict[str, dict[str, str]] = {}
        # Backfills (uid) whose staged-data key Secret this process has created or found.
        self._keyed: set[str] = set()
        self._errors: dict[Key, int] = {}  # consecutive failed reconciles: the retry backoff
        # Deleted backfills cleaned up at once, at most workers/4, so that a burst of deletions
        # neither fills the connection pool (each connection holds 256 KiB of TLS buffers) nor
        # takes every worker from the reconciles; the others wait here, in order (_finalize_step).
        self._finalizing = 0
        self._finalize_limit = max(1, workers // 4)
        self._finalize_parked: dict[Key, None] = {}
        # Waiting worker Pods by namespace, when listed and the list (_pending_pods).
        self._pending: dict[str, tuple[float, asyncio.Future[dict[str, list[WaitingPod]]]]] = {}
        self._tasks: list[asyncio.Task] = []
        # One consumer per lane and one lane per key: a backfill's Events keep their order. The
        # queues exist from here on (no loop needed), their consumers from start().
        lanes = event_lanes(workers)
        self._events: list[asyncio.Queue[tuple[dict[str, Any], Event]]] = [
            asyncio.Queue(maxsize=max(1, -(-event_backlog // lanes))) for _ in range(lanes)
        ]

    # --- watch events -------------------------------------------------------------------

    def on_backfill(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.caches.backfills.pop(key, None)
            self.caches.keys_by_uid.pop(meta["uid"], None)
            self.caches.jobs.pop((meta["namespace"], meta["uid"]), None)
            self._keyed.discard(meta["uid"])
            self.caches.pods.pop(meta["uid"], None)
            self.caches.waiting.pop(meta["uid"], None)
            self.caches.progress.pop(meta["uid"], None)
            self._last_write.pop(key, None)
            self._progress_at.pop(key, None)
            self._refused.pop(meta["uid"], None)
            self._errors.pop(key, None)
            self._finalize_parked.pop(key, None)
            return
        cached = self.caches.backfills.get(key)
        if cached is not None and _older(meta.get("resourceVersion"), cached["metadata"].get("resourceVersion")):
            # The watch is behind our own status write, whose answer (a newer version of the whole
            # object) is cached already. Taken, this event would make the next reconcile decide a
            # transition it has made, and announce it again (3,504 Events for 3,000 transitions
            # at 1,000 backfills, docs/benchmarks.md).
            return
        self.caches.backfills[key] = _slim(body)
        self.caches.keys_by_uid[meta["uid"]] = key
        if not meta.get("deletionTimestamp"):
            self.enqueue(key)
        elif cached is None or not cached["metadata"].get("deletionTimestamp"):
            # First sight of the deletion. Later events of a deleting backfill (the apiserver's
            # own finalizers coming and going) need no round: its Jobs' watch says when.
            self.enqueue(key)

    def on_job(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = child_jobs.owner_uid(body)
        if not uid:
            return  # labelled, but not owned by a backfill: a decoy steers nothing
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if event_type == "DELETED":
            left = self.caches.jobs.get((ns, uid), {})
            left.pop(name, None)
        else:
            self.caches.jobs.setdefault((ns, uid), {})[name] = JobObs.from_job(body)
        key = self.caches.keys_by_uid.get(uid)
        if key is None or key[0] != ns:
            return
        backfill = self.caches.backfills.get(key)
        if backfill is not None and backfill["metadata"].get("deletionTimestamp"):
            # A deleted backfill is read again once its last Job is gone, not at each event of
            # its Jobs and Pods being deleted (each round is a live read of both).
            if not self.caches.jobs.get((ns, uid)):
                self.enqueue(key)
            return
        self.enqueue(key)

    def _needs_pods(self, ns: str, uid: str, status: str) -> list[str]:
        """Finished Jobs of this backfill whose Pods reconcile() will read but has not got."""
        need = []
        pods = list(self.caches.pods.get(uid, {}).values())
        for job in self.caches.jobs.get((ns, uid), {}).values():
            if job.failed:
                if not any(p.job == job.name and not p.succeeded and p.message for p in pods):
                    need.append(job.name)
            elif job.complete and job.phase == child_jobs.STAGING and status in ("", Phase.STAGING):
                # Once transporting, the chunk count is in the status: a restarted operator
                # must not read 1,000 staging Pods again.
                if not any(p.job == job.name and p.succeeded and p.message for p in pods):
                    need.append(job.name)
        return need

    async def _read_pods(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        status = (body.get("status") or {}).get("status") or ""
        if status in TERMINAL:
            return
        for job_name in self._needs_pods(meta["namespace"], meta["uid"], status):
            found = await self.api.finished_pods(meta["namespace"], job_name)
            self.caches.pods.setdefault(meta["uid"], {}).update(found)

    async def _read_waiting(self, body: dict[str, Any]) -> None:
        """Look for stuck Pods of a backfill whose current Jobs have Pods not running, once those
        Jobs are stuck_pod_seconds old, and then every STUCK_RECHECK_S (less often for Pods that
        only wait for a node, stuck_recheck_after): no watch of Pods, and no list at all for the
        common case of Jobs whose Pods all run."""
        meta = body["metadata"]
        uid = meta["uid"]
        status = BackfillStatus.model_validate(body.get("status") or {})
        if status.status not in (Phase.STAGING, Phase.TRANSPORTING):
            self.caches.waiting.pop(uid, None)
            return
        now, wall = time.monotonic(), datetime.now(UTC)
        candidates = [
            j
            for j in current_jobs(self.observe(body), status)
            if running(j)
            and not j.suspended
            and j.ready < max(j.active, 1)
            and j.created_at
            and (wall - parse_timestamp(j.created_at)).total_seconds()
            >= min(self.config.stuck_pod_seconds, self.config.unschedulable_seconds)
        ]
        if not candidates:
            self.caches.waiting.pop(uid, None)
            return
        last = self.caches.waiting.get(uid)
        if last is not None and now < last[0]:
            return
        pending = await self._pending_pods(meta["namespace"])
        found: list[WaitingPod] = []
        for job in candidates:
            waiting = pending.get(job.name, [])
            if not waiting and not job.active:
                waiting = await self.api.failed_create(meta["namespace"], job)
            found += waiting
        # 1 s early: reconcile() wakes the backfill every STUCK_RECHECK_S, and that wake must list.
        self.caches.waiting[uid] = (now + stuck_recheck_after(tuple(found), wall, self.config) - 1, tuple(found))

    async def _pending_pods(self, namespace: str) -> dict[str, list[WaitingPod]]:
        """A namespace's waiting worker Pods, by Job: one list for every backfill of the
        namespace that looks within PENDING_PODS_TTL_S of the last one (reconciles at the same
        moment share the list in flight). Per backfill, a burst of 1,000 queued for a node's 110
        Pod slots made 8 Pod lists each (docs/benchmarks.md)."""
        now = time.monotonic()
        hit = self._pending.get(namespace)
        if hit is None or now - hit[0] > PENDING_PODS_TTL_S or (hit[1].done() and hit[1].exception()):
            if len(self._pending) > 256:  # namespaces no backfill looked at lately
                self._pending = {ns: v for ns, v in self._pending.items() if now - v[0] <= PENDING_PODS_TTL_S}
            hit = self._pending[namespace] = (now, asyncio.ensure_future(self.api.pending_pods(namespace)))
        return await asyncio.shield(hit[1])

    async def _read_progress(self, body: dict[str, Any]) -> None:
        """Count delivered chunks (and their rows: rows_delivered) from the bucket while transport
        workers have more than one chunk each: the Job's status only says when a worker has
        delivered all of its chunks.

        One listing per backfill at most every progress_interval_seconds, and no more than
        progress_reads_per_second over all of them: with more backfills transporting, each one's
        count is read less often (Job completions still count at once). A failed read leaves the
        last count: chunks_left only goes down later, rows_delivered only up, nothing else
        depends on them. A backfill staging (again, after a retry) drops what was read: those
        objects belong to chunks it stages anew."""
        meta = body["metadata"]
        uid = meta["uid"]
        status = BackfillStatus.model_validate(body.get("status") or {})
        if status.status in (Phase.COMPLETED, Phase.CANCELLED, Phase.STAGING):
            self.caches.progress.pop(uid, None)
            return
        jobs = current_jobs(self.observe(body), status) if status.status == Phase.TRANSPORTING else []
        transport = next((j for j in jobs if j.phase == child_jobs.TRANSPORT), None)
        if not (
            transport is not None
            and running(transport)
            and not transport.suspended
            and workers_share_chunks(transport, status.num_chunks)
        ):
            return
        now = time.monotonic()
        last = self.caches.progress.get(uid)
        if last is not None and now < last[0]:
            return
        reading = sum(1 for due, _ in self.caches.progress.values() if due > now - 60) + 1
        interval = max(self.config.progress_interval_seconds, reading / self.config.progress_reads_per_second)
        uri = child_jobs.staging_uri(self.config, meta["namespace"], uid)
        try:
            found = await asyncio.to_thread(staged_files.chunks_with_progress, uri, self.config.connect_timeout_seconds)
        except staged_files.StagedFilesError as e:
            log.warning(
                "%s/%s: %s; chunks_left counts finished workers only until it answers",
                meta["namespace"],
                meta["name"],
                e,
            )
            found = last[1] if last else {}
        # A little early: reconcile() wakes the backfill every progress_interval_seconds.
        self.caches.progress[uid] = (now + interval - 0.05, found)

    # --- the queue ------------------------------------------------------------------------

    def enqueue(self, key: Key, delay: float = 0.0) -> None:
        due = time.monotonic() + delay
        if key in self._due and self._due[key] <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, key))
        self._wake.set()

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker(i)) for i in range(self.workers)]
        self._tasks += [asyncio.create_task(self._post_events(q)) for q in self._events]

    async def stop(self) -> None:
        """Stop the workers and Event lanes (Events still queued are dropped), then close the API session."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.api is not None:
            await self.api.close()

    def _queue_event(self, key: Key, body: dict[str, Any], ev: Event) -> None:
        lane = self._events[hash(key) % len(self._events)]
        try:
            lane.put_nowait((body, ev))
        except asyncio.QueueFull:
            metrics.EVENTS_DROPPED.inc()
            log.warning(
                "%s/%s: Event %s not recorded: %d Events already wait for the API server",
                key[0],
                key[1],
                ev.reason,
                lane.qsize(),
            )

    async def _post_events(self, lane: asyncio.Queue[tuple[dict[str, Any], Event]]) -> None:
        while True:
            body, ev = await lane.get()
            meta = body["metadata"]
            try:
                with logs.backfill_context(namespace=meta["namespace"], name=meta["name"], job_id=meta.get("uid")):
                    await self._post_one(body, ev)
            finally:
                lane.task_done()
                # Not held while the lane waits for the next one: the last backfill it posted for
                # would stay in memory after its deletion (scale_probe's census found 8, one per lane).
                del body, ev, meta

    async def _post_one(self, body: dict[str, Any], ev: Event) -> None:
        try:
            await self.api.post_event(body, ev)  # logs the API's refusals: an Event is not retried
        except Exception:  # anything else must not end the lane, or its Events pile up unposted
            log.exception("could not record event %s", ev.reason)

    def _is_new(self, key: Key) -> bool:
        body = self.caches.backfills.get(key)
        return body is not None and not (body.get("status") or {}).get("status")

    async def _next(self) -> Key:
        """The next key to reconcile: due, not busy, and a new backfill before anything else.

        New backfills go first because their first reconcile is what a user waits for after
        `kubectl apply` (its staging Job), while the rest of the queue is work already under way.
        On a saturated API server a burst of creates otherwise waited behind the Job events and
        completions of earlier backfills: apply -> staging Job p50 5.4 s at ~30 creates/s
        (docs/benchmarks.md). Only a burst of new backfills can delay the others, and only
        while it lasts.
        """
        while True:
            now = time.monotonic()
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
                    return key
            timeout = (self._heap[0][0] - now) if self._heap else None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
            except TimeoutError:
                pass

    async def _worker(self, n: int) -> None:
        while True:
            key = await self._next()
            self._busy.add(key)
            try:
                with metrics.RECONCILE_SECONDS.time(), logs.backfill_context(**self._log_fields(key)):
                    await self.process(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad object must not stop the others
                metrics.RECONCILE_ERRORS.inc()
                n = self._errors[key] = self._errors.get(key, 0) + 1
                delay = min(RETRY_FIRST_S * 2 ** (n - 1), RETRY_MAX_S)
                with logs.backfill_context(**self._log_fields(key)):
                    log.exception("reconcile of %s/%s failed (%d in a row): %s; retrying in %.0fs", *key, n, e, delay)
                self.enqueue(key, delay)
            else:
                self._errors.pop(key, None)
            finally:
                self._busy.discard(key)
                if key in self._again:
                    self._again.discard(key)
                    self.enqueue(key)

    # --- one reconcile --------------------------------------------------------------------

    def _log_fields(self, key: Key) -> dict[str, Any]:
        """What every log line about this backfill carries (beam_contract.logs)."""
        body = self.caches.backfills.get(key) or {}
        meta = body.get("metadata") or {}
        phase = (body.get("status") or {}).get("status") or "pending"
        return {
            "namespace": key[0],
            "name": key[1],
            "job_id": meta.get("uid"),
            "phase": "deleting" if meta.get("deletionTimestamp") else phase,
        }

    def observe(self, body: dict[str, Any], now: datetime | None = None) -> Observed:
        meta = body["metadata"]
        uid = meta["uid"]
        return Observed(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=uid,
            generation=meta.get("generation", 1),
            creation_timestamp=meta.get("creationTimestamp", ""),
            spec=body.get("spec") or {},
            status=BackfillStatus.model_validate(body.get("status") or {}),
            jobs=tuple(self.caches.jobs.get((meta["namespace"], uid), {}).values()),
            pods=tuple(self.caches.pods.get(uid, {}).values()),
            refused=dict(self._refused.get(uid, {})),
            waiting=self.caches.waiting.get(uid, (0.0, ()))[1],
            progress=self.caches.progress[uid][1] if uid in self.caches.progress else None,
            now=now or datetime.now(UTC),
            queue_name=(meta.get("labels") or {}).get(child_jobs.QUEUE_NAME_LABEL, ""),
            namespace_load=self._namespace_load(body) if not (body.get("status") or {}).get("status") else None,
        )

    def _namespace_load(self, body: dict[str, Any]) -> tuple[int, int, int]:
        """Live backfills of this one's namespace created before it, and their specs' bytes;
        and its own spec's bytes. Asked once per backfill, before it starts."""
        meta = body["metadata"]
        ns, mine = meta["namespace"], (meta.get("creationTimestamp") or "", meta["name"])
        live = spec_bytes = 0
        for (other_ns, name), other in self.caches.backfills.items():
            if other_ns != ns or name == meta["name"]:
                continue
            m = other["metadata"]
            if (m.get("creationTimestamp") or "", name) >= mine or m.get("deletionTimestamp"):
                continue
            if (other.get("status") or {}).get("status") in TERMINAL:
                continue
            live += 1
            spec_bytes += m.get(SPEC_BYTES, 0)
        return live, spec_bytes, meta.get(SPEC_BYTES, 0)

    async def process(self, key: Key) -> None:
        leader.before_writing()
        body = self.caches.backfills.get(key)
        if body is None:
            return
        if body["metadata"].get("deletionTimestamp"):
            if FINALIZER in (body["metadata"].get("finalizers") or ()):
                await self._finalize_step(key, body)
            return
        if FINALIZER not in (body["metadata"].get("finalizers") or ()):
            # Before any Job exists: a backfill deleted from then on waits for its clean-up.
            if not await self._add_finalizer(key, body):
                return
            body = self.caches.backfills.get(key) or body
        await self._read_pods(body)
        await self._read_waiting(body)
        await self._read_progress(body)
        old = body.get("status") or {}
        observed = self.observe(body)
        if wants_retry(observed.spec, observed.status) and observed.status.num_chunks is not None:
            # Rare (a person asked for it): one look at the bucket, in a thread, as deletions are.
            uri = child_jobs.staging_uri(self.config, observed.namespace, observed.uid)
            staged = await asyncio.to_thread(staged_files.manifest_exists, uri, self.config.connect_timeout_seconds)
            observed = replace(observed, staged=staged)
            self._refused.pop(observed.uid, None)  # the last attempt's refusals are not this one's
        decision = reconcile(observed, self.config)
        if body["metadata"].get(SLIMMED) and any(isinstance(a, CreateJob) for a in decision.actions):
            # A Job carries the whole spec: read it again, once per Job, rather than keep it.
            meta = body["metadata"]
            full = await self.api.get_backfill(meta["namespace"], meta["name"])
            if full is None or full["metadata"]["uid"] != meta["uid"]:
                return  # deleted meanwhile: its watch event says what next
            decision = reconcile(replace(observed, spec=full.get("spec") or {}), self.config)
        new = decision.status.document()
        changed = new != _clean(old)
        if changed and not decision.transition and not decision.actions:
            # Only a counter moved: hold the write until the interval has passed.
            wait = self._last_write.get(key, 0.0) + self.config.status_interval_seconds - time.monotonic()
            if wait > 0:
                self.enqueue(key, wait)
                return
        if any(isinstance(a, DeleteStaged) for a in decision.actions):
            # The status will say staged_files_deleted: it must not be written before it is true.
            for action in decision.actions:
                await self._apply(body, action)
            if changed:
                await self._write_status(key, _with_removals(new, old))
        else:
            # A Job create (or delete) and the status write do not depend on each other: if
            # the create fails after the status said `staging` or `transporting`, the next
            # reconcile sees no Job for that phase and asks again. Sent together, a new
            # backfill's first reconcile costs one API round trip instead of two, which is what
            # limits how fast a burst of new backfills gets its staging Jobs (docs/benchmarks.md).
            calls = [self._apply(body, a) for a in decision.actions]
            if changed:
                calls.append(self._write_status(key, _with_removals(new, old)))
            results = await asyncio.gather(*calls, return_exceptions=True)
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        self._count_progress(key, body, old, new, decision)
        for ev in decision.events:
            if ev.reason in TRANSITION_REASONS:
                metrics.TRANSITIONS.labels(to=ev.reason.lower()).inc()
            # Events are for people reading `kubectl describe`; nothing waits on them. Posting
            # them off the worker's path saved a third of a new backfill's reconcile time.
            self._queue_event(key, body, ev)
            log.info("%s/%s: %s: %s", key[0], key[1], ev.reason, ev.message)
        if decision.requeue_after is not None:
            self.enqueue(key, decision.requeue_after)

    def _count_progress(
        self, key: Key, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], decision: Any
    ) -> None:
        if key not in self._progress_at or old.get("status") != new.get("status"):
            self._progress_at[key] = time.monotonic()
        before, after = old.get("chunks_left"), new.get("chunks_left")
        if isinstance(before, int) and isinstance(after, int) and after < before:
            self._progress_at[key] = time.monotonic()
            for kind, n in _destination_types(body).items():
                metrics.CHUNKS_DELIVERED.labels(destination_type=kind).inc((before - after) * n)
        if any(ev.reason == "Completed" for ev in decision.events) and new.get("num_chunks"):
            # What the workers reported per destination: read once, off the reconcile's path.
            task = asyncio.create_task(self._count_delivered(body))
            self._tasks.append(task)
            task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _count_delivered(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        attempt = (body.get("status") or {}).get("attempt") or 1
        job = child_jobs.child_job_name(meta["name"], meta["uid"], child_jobs.TRANSPORT, attempt)
        try:
            pods = await self.api.finished_pods(meta["namespace"], job)
        except Exception as e:  # metrics must never fail a backfill
            log.warning("%s/%s: cannot read the workers' delivery figures: %s", meta["namespace"], meta["name"], e)
            return
        for pod in pods.values():
            if not pod.succeeded or not pod.message.startswith("{"):
                continue
            try:
                reported = json.loads(pod.message).get("destinations") or []
            except ValueError:
                continue
            for d in reported:
                kind = d.get("type")
                if kind not in DESTINATION_TYPES:
                    continue
                metrics.ROWS_DELIVERED.labels(destination_type=kind).inc(max(int(d.get("rows") or 0), 0))
                metrics.BYTES_DELIVERED.labels(destination_type=kind).inc(max(int(d.get("bytes") or 0), 0))
                # A worker reports its chunks' total per destination: each gets the mean.
                chunks = d.get("chunks", 1)
                if isinstance(d.get("seconds"), (int, float)) and isinstance(chunks, int) and chunks > 0:
                    for _ in range(min(chunks, 1000)):
                        metrics.CHUNK_SECONDS.labels(destination_type=kind).observe(d["seconds"] / chunks)

    def controller_state(self) -> dict[str, float]:
        """For the queue-depth, chunks-left and stall gauges, computed when scraped."""
        now = time.monotonic()
        stalled, left = 0.0, 0
        for key, b in list(self.caches.backfills.items()):
            st = b.get("status") or {}
            if st.get("status") not in (Phase.STAGING, Phase.TRANSPORTING):
                continue
            left += st.get("chunks_left") or 0
            if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in st.get("conditions") or []):
                continue
            stalled = max(stalled, now - self._progress_at.get(key, now))
        return {
            "queue_depth": len(self._due) + len(self._ready) + len(self._ready_new),
            "seconds_since_progress_max": stalled,
            "chunks_left": left,
        }

    async def _write_status(self, key: Key, new: dict[str, Any]) -> None:
        patched = await self.api.patch_status(key[0], key[1], new)
        self._last_write[key] = time.monotonic()
        metrics.STATUS_WRITES.inc()
        if patched is not None:
            # Our own write must be what the next reconcile sees, even before its watch
            # event arrives; otherwise a transition could be decided (and announced) twice.
            self._cache_own_write(key, patched)

    def _cache_own_write(self, key: Key, body: dict[str, Any]) -> None:
        """The answer to our own write, unless a newer version of the object is cached already
        (a watch event, or a write sent at the same time whose answer came first)."""
        cached = self.caches.backfills.get(key)
        if cached is not None and not _older(
            body["metadata"].get("resourceVersion"), cached["metadata"].get("resourceVersion")
        ):
            self.caches.backfills[key] = _slim(body)

    async def _apply(self, body: dict[str, Any], action: Action) -> None:
        ns = body["metadata"]["namespace"]
        match action:
            case CreateJob(manifest=manifest, config_map=config_map, key_secret=key_secret):
                meta = manifest["metadata"]
                uid = meta["labels"][child_jobs.LABEL_JOB_ID]
                try:
                    if key_secret is not None and uid not in self._keyed:
                        # Drawn here, not in reconcile(): a key is random, and only its first
                        # create counts (409 keeps the Secret, and so the key, as it is).
                        key = base64.b64encode(os.urandom(32)).decode()
                        await self.api.create_secret(
                            ns, {**key_secret, "stringData": {child_jobs.STAGING_KEY_SECRET_KEY: key}}
                        )
                        self._keyed.add(uid)
                    if config_map is not None:
                        # Before the Job: its Pods mount it, and would wait in ContainerCreating.
                        await self.api.create_config_map(ns, config_map)
                    created = await self.api.create_job(ns, manifest)
                except ApiError as e:
                    if e.status not in PERMANENT_REFUSALS:
                        raise  # 429, 5xx, a timeout: retried with backoff
                    # Asking again would be refused again, every few seconds, forever.
                    kind = meta["labels"].get(child_jobs.LABEL_PHASE, "")
                    self._refused.setdefault(uid, {})[kind] = f"HTTP {e.status} {e.reason}: {e.api_message}"
                    log.warning("%s/%s: the %s Job was refused: %s", ns, body["metadata"]["name"], kind, e)
                    self.enqueue((ns, body["metadata"]["name"]))
                    return
                # Expect the Job before its watch event arrives: a reconcile in between must not
                # ask for it again (a 409 each time, as controller-runtime's expectations avoid).
                expected = JobObs(name=meta["name"], phase=meta["labels"].get(child_jobs.LABEL_PHASE, ""))
                self.caches.jobs.setdefault((ns, uid), {}).setdefault(meta["name"], expected)
                log.info(
                    "%s/%s: %s job %s",
                    ns,
                    body["metadata"]["name"],
                    "created" if created else "found existing",
                    meta["name"],
                )
            case DeleteJob(name=name):
                await self.api.delete_job(ns, name)
            case DeleteBackfill():
                meta = body["metadata"]
                deleting = await self.api.delete_backfill(ns, meta["name"], meta["uid"])
                if deleting is not None:
                    # Cached with its deletionTimestamp, so that reconciles queued before the watch
                    # shows it skip it: each would delete it and announce Expired again (449
                    # deletes for 300 expiring backfills, docs/benchmarks.md).
                    self._cache_own_write((ns, meta["name"]), deleting)
                    self.enqueue((ns, meta["name"]))  # its clean-up
                log.info("%s/%s: deleted: its ttl_seconds_after_finished has passed", ns, meta["name"])
            case SuspendJob(name=name, suspend=suspend):
                await self.api.suspend_job(ns, name, suspend)
                log.info("%s/%s: %s job %s", ns, body["metadata"]["name"], "suspended" if suspend else "resumed", name)
            case DeleteStaged(uri=uri):
                leader.before_writing()
                # Blocking (google-cloud-storage), once per finished backfill: rare enough for a
                # thread of the loop's default executor rather than a pool of our own.
                n = await asyncio.to_thread(staged_files.delete_staged, uri, self.config.connect_timeout_seconds)
                log.info("%s/%s: deleted %d staged objects under %s", ns, body["metadata"]["name"], n, uri)

    async def _add_finalizer(self, key: Key, body: dict[str, Any]) -> bool:
        """Our finalizer on the backfill; False if the apiserver has a newer version (its watch
        event, or the 1 s re-queue, brings the backfill back) or it is gone."""
        meta = body["metadata"]
        added = await self.api.add_finalizer(
            key[0], key[1], [*(meta.get("finalizers") or ()), FINALIZER], meta.get("resourceVersion")
        )
        if added is None:
            self.enqueue(key, 1.0)
            return False
        self._cache_own_write(key, added)
        return True

    async def _finalize_step(self, key: Key, body: dict[str, Any]) -> None:
        if self._finalizing >= self._finalize_limit:
            self._finalize_parked[key] = None  # taken up when a running clean-up step ends
            return
        self._finalizing += 1
        try:
            await self._finalize_round(key, body)
        finally:
            self._finalizing -= 1
            if self._finalize_parked:
                parked = next(iter(self._finalize_parked))
                del self._finalize_parked[parked]
                self.enqueue(parked)

    async def _finalize_round(self, key: Key, body: dict[str, Any]) -> None:
        """One round of a deleted backfill's clean-up; the finalizer goes once nothing is left.

        Decided from live reads, never the watch cache: a cache that has not seen a Job yet (a
        restarted operator) or has seen the last one go before the apiserver has (or the other
        way round) would delete staged files under a running worker, or release the finalizer
        with the files still there.

        The cache only says when to read again: after deleting the Jobs (Foreground: a Job goes
        after its Pods), the backfill waits in the queue, holding no worker, until the watch
        shows its last Job gone (on_job), or FINALIZE_RECHECK_S in case it missed a DELETED.
        kopf's on.delete handler did this before, and held the whole body of every backfill
        being deleted in a worker of its own until the end: +41,000 Python objects at half of
        300 expiring together, and 142 MB after 1,000 had expired against 104 MB before; here,
        105.6 MB against 102.2 MB (docs/benchmarks.md).
        """
        meta = body["metadata"]
        ns, uid = meta["namespace"], meta["uid"]
        jobs, pods_left = await self.api.live_children(ns, uid)
        actions = finalize_actions(ns, uid, jobs, pods_left, self.config)
        for action in actions:
            await self._apply(body, action)
        if not any(isinstance(a, DeleteStaged) for a in actions):
            log.info("%s/%s: deleting: waiting for %d Jobs and %d Pods to go", ns, meta["name"], len(jobs), pods_left)
            # Soon when the live read found Jobs the watch has not shown yet; otherwise the Jobs'
            # watch wakes it, and Pods (not watched) are looked at every FINALIZE_RECHECK_S.
            waiting_on_watch = jobs and not self.caches.jobs.get((ns, uid))
            self.enqueue(key, 1.0 if waiting_on_watch else FINALIZE_RECHECK_S)
            return
        if not await self.api.remove_finalizer(ns, meta["name"], uid, meta.get("finalizers") or [], FINALIZER):
            # The finalizers changed since this version (the apiserver's own, or another
            # controller's): again with the newer one, the staged prefix already empty.
            self.enqueue(key, 1.0)
            return
        # Until its DELETED arrives, a round queued meanwhile finds nothing to do.
        cached = self.caches.backfills.get(key)
        if cached is not None and cached["metadata"]["uid"] == uid:
            left = [f for f in cached["metadata"].get("finalizers") or () if f != FINALIZER]
            self.caches.backfills[key] = {**cached, "metadata": {**cached["metadata"], "finalizers": left}}
        log.info("%s/%s: deleted: no Job, Pod or staged file of it is left", ns, meta["name"])

    def count_by_status(self) -> dict[str, int]:
        """For the beam_backfills gauge, computed when scraped rather than on every event."""
        counts = dict.fromkeys(("pending", *Phase), 0)
        for b in list(self.caches.backfills.values()):
            s = (b.get("status") or {}).get("status") or "pending"
            counts[s] = counts.get(s, 0) + 1
        return counts
