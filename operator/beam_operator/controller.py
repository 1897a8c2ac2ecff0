"""The controller loop: observe -> reconcile -> apply -> record, one round per backfill.

kopf delivers watch events (handlers.py); this module keeps what they say in memory, one
observe.Backfill record per backfill, and runs rounds through a keyed work queue
(runtime.queue: one key never processed by two workers at once, coalesced when events pile up,
delayed re-queues in one heap, new backfills first), as controller-runtime does. A round:
- observe: the cached body and Jobs, and the few reads they call for (observe.Observer);
- reconcile: the pure decision (reconcile.py);
- apply: its actions, a Job create sent together with the status write;
- record: the status (runtime.status: a write that only moves counters waits for
  `status_interval_seconds` per backfill, a transition goes at once, so a busy transport Job
  cannot flood the API server) and the Events (runtime.events: lanes off the worker's path).

API calls are coroutines on the event loop (kubeclient.KubeApi, one aiohttp session with a
bounded connection pool): a worker awaits them, no thread per request, and the pool's size
bounds the requests in flight (docs/operations.md). The staged files' deletion
(google-cloud-storage, blocking) runs in a thread, once per finished backfill. A deleted
backfill's clean-up goes through the same queue (_finalize_step).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
from dataclasses import replace
from typing import Any, Protocol

from beam_contract import logs
from beam_contract.model import GROUP, Phase

from . import child_jobs, leader, metrics, staged_files
from .config import OperatorConfig
from .kubeclient import ApiError
from .observe import SLIMMED, Backfill, JobObs, Observer, Reads, slim
from .reconcile import (
    TRANSITION_REASONS,
    Action,
    CreateJob,
    Decision,
    DeleteBackfill,
    DeleteJob,
    DeleteStaged,
    SuspendJob,
    finalize_actions,
    reconcile,
    wants_retry,
)
from .runtime.events import EventRecorder, event_lanes
from .runtime.kube import Kube
from .runtime.queue import WorkQueue
from .runtime.status import StatusRecorder, older

log = logging.getLogger("beam_operator.controller")

Key = tuple[str, str]  # namespace, name

# What a Job create answers when asking again cannot help: a bad or invalid manifest, a
# ResourceQuota or an admission policy that forbids it, a namespace that is gone.
PERMANENT_REFUSALS = frozenset({400, 403, 404, 422})
# What holds a deleted backfill until its Jobs, Pods and staged files are gone. The controller
# adds and removes it itself (_add_finalizer, _finalize_step), not kopf: see handlers.py.
FINALIZER = f"{GROUP}/cleanup"
# A deleted backfill's Jobs and Pods are read again when the watch shows its last Job gone, or
# after this long in case the watch missed a DELETED.
FINALIZE_RECHECK_S = 10.0

DESTINATION_TYPES = ("kafka", "webhook", "nats", "sns")


def _destination_types(body: dict[str, Any]) -> dict[str, int]:
    """How many destinations of each type the backfill's spec names."""
    out: dict[str, int] = {}
    for d in (body.get("spec") or {}).get("destinations") or []:
        if d.get("type") in DESTINATION_TYPES:
            out[d["type"]] = out.get(d["type"], 0) + 1
    return out


def api_connections(workers: int) -> int:
    """The default bound of the API session: a round sends its Job create and its status write
    together (two per worker), plus one per Event lane."""
    return 2 * workers + event_lanes(workers)


class ControllerApi(Kube, Reads, Protocol):
    """Every call the controller makes: kubeclient.KubeApi."""


class Controller:
    def __init__(
        self, config: OperatorConfig, api: ControllerApi, *, workers: int = 4, event_backlog: int = 1000
    ) -> None:
        self.config = config
        self.api = api
        self.workers = workers
        self.backfills: dict[Key, Backfill] = {}
        # The Job watch's cache by (namespace, owner uid), then Job name: a Job counts only in
        # its owner's namespace, and may be seen before its backfill.
        self.jobs: dict[tuple[str, str], dict[str, JobObs]] = {}
        self._keys_by_uid: dict[str, Key] = {}
        self.queue: WorkQueue[Key] = WorkQueue(self._is_new)
        self.observer = Observer(config, api, self.backfills, self.jobs)
        self.status = StatusRecorder(api, config.status_interval_seconds, self._cached, self._keep)
        self.events = EventRecorder(api, event_lanes(workers), event_backlog)
        # Deleted backfills cleaned up at once, at most workers/4, so that a burst of deletions
        # neither fills the connection pool (each connection holds 256 KiB of TLS buffers) nor
        # takes every worker from the rounds; the others wait here, in order (_finalize_step).
        self._finalizing = 0
        self._finalize_limit = max(1, workers // 4)
        self._finalize_parked: dict[Key, None] = {}
        self._tasks: list[asyncio.Task] = []

    def _cached(self, key: Key) -> dict[str, Any] | None:
        rec = self.backfills.get(key)
        return None if rec is None else rec.body

    def _keep(self, key: Key, body: dict[str, Any]) -> None:
        self.backfills[key].body = slim(body)

    def _is_new(self, key: Key) -> bool:
        rec = self.backfills.get(key)
        return rec is not None and not rec.status

    # --- watch events -------------------------------------------------------------------

    def on_backfill(self, event_type: str | None, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        if event_type == "DELETED":
            self.backfills.pop(key, None)
            self._keys_by_uid.pop(meta["uid"], None)
            self.jobs.pop((meta["namespace"], meta["uid"]), None)
            self.queue.forget(key)
            self.status.forget(key)
            self._finalize_parked.pop(key, None)
            return
        rec = self.backfills.get(key)
        cached = None if rec is None else rec.body
        if cached is not None and older(meta.get("resourceVersion"), cached["metadata"].get("resourceVersion")):
            # The watch is behind our own status write, whose answer (a newer version of the whole
            # object) is cached already. Taken, this event would make the next round decide a
            # transition it has made, and announce it again (docs/benchmarks.md, "Operator at
            # scale": the confirmation runs' Events per transition).
            return
        if rec is None or rec.uid != meta["uid"]:
            self.backfills[key] = Backfill(slim(body))  # a new backfill of that name: nothing carried over
        else:
            rec.body = slim(body)
        self._keys_by_uid[meta["uid"]] = key
        if not meta.get("deletionTimestamp"):
            self.queue.add(key)
        elif cached is None or not cached["metadata"].get("deletionTimestamp"):
            # First sight of the deletion. Later events of a deleting backfill (the apiserver's
            # own finalizers coming and going) need no round: its Jobs' watch says when.
            self.queue.add(key)

    def on_job(self, event_type: str | None, body: dict[str, Any]) -> None:
        uid = child_jobs.owner_uid(body)
        if not uid:
            return  # labelled, but not owned by a backfill: a decoy steers nothing
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        if event_type == "DELETED":
            self.jobs.get((ns, uid), {}).pop(name, None)
        else:
            self.jobs.setdefault((ns, uid), {})[name] = JobObs.from_job(body)
        key = self._keys_by_uid.get(uid)
        if key is None or key[0] != ns:
            return
        rec = self.backfills.get(key)
        if rec is not None and rec.body["metadata"].get("deletionTimestamp"):
            # A deleted backfill is read again once its last Job is gone, not at each event of
            # its Jobs and Pods being deleted (each round is a live read of both).
            if not self.jobs.get((ns, uid)):
                self.queue.add(key)
            return
        self.queue.add(key)

    # --- the workers ----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        self.events.start()

    async def stop(self) -> None:
        """Stop the workers and Event lanes (Events still queued are dropped), then close the API session."""
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.stop()
        if self.api is not None:
            await self.api.close()

    async def _worker(self) -> None:
        while True:
            key = await self.queue.get()
            try:
                with metrics.RECONCILE_SECONDS.time(), logs.backfill_context(**self._log_fields(key)):
                    await self.process(key)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # one bad object must not stop the others
                metrics.RECONCILE_ERRORS.inc()
                n, delay = self.queue.retry(key)
                with logs.backfill_context(**self._log_fields(key)):
                    log.exception("reconcile of %s/%s failed (%d in a row): %s; retrying in %.0fs", *key, n, e, delay)
            else:
                self.queue.forget(key)
            finally:
                self.queue.done(key)

    def _log_fields(self, key: Key) -> dict[str, Any]:
        """What every log line about this backfill carries (beam_contract.logs)."""
        rec = self.backfills.get(key)
        meta = rec.body["metadata"] if rec else {}
        return {
            "namespace": key[0],
            "name": key[1],
            "job_id": meta.get("uid"),
            "phase": "deleting" if meta.get("deletionTimestamp") else (rec.status if rec else "") or "pending",
        }

    # --- one round ------------------------------------------------------------------------

    async def process(self, key: Key) -> None:
        leader.before_writing()
        rec = self.backfills.get(key)
        if rec is None:
            return
        body = rec.body
        if body["metadata"].get("deletionTimestamp"):
            if FINALIZER in (body["metadata"].get("finalizers") or ()):
                await self._finalize_step(key, body)
            return
        if FINALIZER not in (body["metadata"].get("finalizers") or ()):
            # Before any Job exists: a backfill deleted from then on waits for its clean-up.
            if not await self._add_finalizer(key, body):
                return
            body = self._cached(key) or body
        # observe
        old = body.get("status") or {}
        observed = await self.observer.read(body)
        if wants_retry(observed.spec, observed.status) and observed.status.num_chunks is not None:
            # Rare (a person asked for it): one look at the bucket, in a thread, as deletions are.
            uri = child_jobs.staging_uri(self.config, observed.namespace, observed.uid)
            staged = await asyncio.to_thread(staged_files.manifest_exists, uri, self.config.connect_timeout_seconds)
            observed = replace(observed, staged=staged)
            rec.refused.clear()  # the last attempt's refusals are not this one's
        # reconcile
        decision = reconcile(observed, self.config)
        if body["metadata"].get(SLIMMED) and any(isinstance(a, CreateJob) for a in decision.actions):
            # A Job carries the whole spec: read it again, once per Job, rather than keep it.
            meta = body["metadata"]
            full = await self.api.get_backfill(meta["namespace"], meta["name"])
            if full is None or full["metadata"]["uid"] != meta["uid"]:
                return  # deleted meanwhile: its watch event says what next
            decision = reconcile(replace(observed, spec=full.get("spec") or {}), self.config)
        new = decision.status.document()
        changed = self.status.changed(old, new)
        if changed and not decision.transition and not decision.actions and (wait := self.status.wait(key)) > 0:
            # Only a counter moved: hold the write until the interval has passed.
            self.queue.add(key, wait)
            return
        # apply, and the status with it
        await self._apply_decision(key, body, decision.actions, old, new if changed else None)
        # record
        self._record_decision(key, body, old, new, decision)

    async def _apply_decision(
        self, key: Key, body: dict[str, Any], actions: list[Action], old: dict[str, Any], new: dict[str, Any] | None
    ) -> None:
        """The actions, and the status `new` if it changed."""
        if any(isinstance(a, DeleteStaged) for a in actions):
            # The status will say staged_files_deleted: it must not be written before it is true.
            for action in actions:
                await self._apply(body, action)
            if new is not None:
                await self.status.write(key, old, new)
            return
        # A Job create (or delete) and the status write do not depend on each other: if the
        # create fails after the status said `staging` or `transporting`, the next round sees no
        # Job of that kind and asks again. Sent together, a new backfill's first round costs one
        # API round trip instead of two, which is what limits how fast a burst of new backfills
        # gets its staging Jobs (docs/benchmarks.md, "Operator at scale": the table "1,000 × 1,
        # burst").
        calls = [self._apply(body, a) for a in actions]
        if new is not None:
            calls.append(self.status.write(key, old, new))
        results = await asyncio.gather(*calls, return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _record_decision(
        self, key: Key, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], decision: Decision
    ) -> None:
        """The round's Events and metrics, and when to look again."""
        self._count_progress(key, body, old, new, decision)
        for ev in decision.events:
            if ev.reason in TRANSITION_REASONS:
                metrics.TRANSITIONS.labels(to=ev.reason.lower()).inc()
            # Off the worker's path: nothing waits on an Event (runtime.events).
            self.events.record(key, body, ev)
            log.info("%s/%s: %s: %s", key[0], key[1], ev.reason, ev.message)
        if decision.requeue_after is not None:
            self.queue.add(key, decision.requeue_after)

    async def _apply(self, body: dict[str, Any], action: Action) -> None:
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        match action:
            case CreateJob(manifest=manifest, config_map=config_map, key_secret=key_secret):
                meta = manifest["metadata"]
                uid = meta["labels"][child_jobs.LABEL_JOB_ID]
                rec = self.backfills.get((ns, name))
                rec = rec if rec is not None and rec.uid == uid else None
                try:
                    if key_secret is not None and not (rec and rec.keyed):
                        # Drawn here, not in reconcile(): a key is random, and only its first
                        # create counts (409 keeps the Secret, and so the key, as it is).
                        key = base64.b64encode(os.urandom(32)).decode()
                        await self.api.create_secret(
                            ns, {**key_secret, "stringData": {child_jobs.STAGING_KEY_SECRET_KEY: key}}
                        )
                        if rec is not None:
                            rec.keyed = True
                    if config_map is not None:
                        # Before the Job: its Pods mount it, and would wait in ContainerCreating.
                        await self.api.create_config_map(ns, config_map)
                    created = await self.api.create_job(ns, manifest)
                except ApiError as e:
                    if e.status not in PERMANENT_REFUSALS:
                        raise  # 429, 5xx, a timeout: retried with backoff
                    # Asking again would be refused again, every few seconds, forever.
                    kind = meta["labels"].get(child_jobs.LABEL_KIND, "")
                    if rec is not None:
                        rec.refused[kind] = f"HTTP {e.status} {e.reason}: {e.api_message}"
                    log.warning("%s/%s: the %s Job was refused: %s", ns, name, kind, e)
                    self.queue.add((ns, name))
                    return
                # Expect the Job before its watch event arrives: a round in between must not ask
                # for it again (a 409 each time, as controller-runtime's expectations avoid).
                expected = JobObs(name=meta["name"], kind=meta["labels"].get(child_jobs.LABEL_KIND, ""))
                self.jobs.setdefault((ns, uid), {}).setdefault(meta["name"], expected)
                log.info("%s/%s: %s job %s", ns, name, "created" if created else "found existing", meta["name"])
            case DeleteJob(name=job):
                await self.api.delete_job(ns, job)
            case DeleteBackfill():
                deleting = await self.api.delete_backfill(ns, name, body["metadata"]["uid"])
                if deleting is not None:
                    # Cached with its deletionTimestamp, so that rounds queued before the watch
                    # shows it skip it: each would delete it and announce Expired again
                    # (docs/benchmarks.md, "Finished backfills expiring": `delete beambackfills`).
                    self.status.keep_own((ns, name), deleting)
                    self.queue.add((ns, name))  # its clean-up
                log.info("%s/%s: deleted: its ttl_seconds_after_finished has passed", ns, name)
            case SuspendJob(name=job, suspend=suspend):
                await self.api.suspend_job(ns, job, suspend)
                log.info("%s/%s: %s job %s", ns, name, "suspended" if suspend else "resumed", job)
            case DeleteStaged(uri=uri):
                leader.before_writing()
                # Blocking (google-cloud-storage), once per finished backfill: rare enough for a
                # thread of the loop's default executor rather than a pool of our own.
                n = await asyncio.to_thread(staged_files.delete_staged, uri, self.config.connect_timeout_seconds)
                log.info("%s/%s: deleted %d staged objects under %s", ns, name, n, uri)

    # --- metrics --------------------------------------------------------------------------

    def _count_progress(
        self, key: Key, body: dict[str, Any], old: dict[str, Any], new: dict[str, Any], decision: Decision
    ) -> None:
        now, rec = time.monotonic(), self.backfills.get(key)
        if rec is not None and (rec.progress_at is None or old.get("status") != new.get("status")):
            rec.progress_at = now
        before, after = old.get("chunks_left"), new.get("chunks_left")
        if isinstance(before, int) and isinstance(after, int) and after < before:
            if rec is not None:
                rec.progress_at = now
            for kind, n in _destination_types(body).items():
                metrics.CHUNKS_DELIVERED.labels(destination_type=kind).inc((before - after) * n)
        if any(ev.reason == "Completed" for ev in decision.events) and new.get("num_chunks"):
            # What the workers reported per destination: read once, off the round's path.
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
        for rec in list(self.backfills.values()):
            st = rec.body.get("status") or {}
            if st.get("status") not in (Phase.STAGING, Phase.TRANSPORTING):
                continue
            left += st.get("chunks_left") or 0
            if any(c.get("type") == "Suspended" and c.get("status") == "True" for c in st.get("conditions") or []):
                continue
            stalled = max(stalled, now - (now if rec.progress_at is None else rec.progress_at))
        return {
            "queue_depth": len(self.queue),
            "seconds_since_progress_max": stalled,
            "chunks_left": left,
        }

    def count_by_status(self) -> dict[str, int]:
        """For the beam_backfills gauge, computed when scraped rather than on every event."""
        counts = dict.fromkeys(("pending", *Phase), 0)
        for rec in list(self.backfills.values()):
            s = rec.status or "pending"
            counts[s] = counts.get(s, 0) + 1
        return counts

    # --- deletion -------------------------------------------------------------------------

    async def _add_finalizer(self, key: Key, body: dict[str, Any]) -> bool:
        """Our finalizer on the backfill; False if the apiserver has a newer version (its watch
        event, or the 1 s re-queue, brings the backfill back) or it is gone."""
        meta = body["metadata"]
        added = await self.api.add_finalizer(
            key[0], key[1], [*(meta.get("finalizers") or ()), FINALIZER], meta.get("resourceVersion")
        )
        if added is None:
            self.queue.add(key, 1.0)
            return False
        self.status.keep_own(key, added)
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
                self.queue.add(parked)

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
        being deleted in a worker of its own until the end: the operator's memory stayed up
        long after a mass expiry, where now it returns to what it was with all of them ended
        (docs/benchmarks.md, "Finished backfills expiring").
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
            waiting_on_watch = jobs and not self.jobs.get((ns, uid))
            self.queue.add(key, 1.0 if waiting_on_watch else FINALIZE_RECHECK_S)
            return
        if not await self.api.remove_finalizer(ns, meta["name"], uid, meta.get("finalizers") or [], FINALIZER):
            # The finalizers changed since this version (the apiserver's own, or another
            # controller's): again with the newer one, the staged prefix already empty.
            self.queue.add(key, 1.0)
            return
        # Until its DELETED arrives, a round queued meanwhile finds nothing to do.
        rec = self.backfills.get(key)
        if rec is not None and rec.uid == uid:
            left = [f for f in rec.body["metadata"].get("finalizers") or () if f != FINALIZER]
            rec.body = {**rec.body, "metadata": {**rec.body["metadata"], "finalizers": left}}
        log.info("%s/%s: deleted: no Job, Pod or staged file of it is left", ns, meta["name"])
