"""What the controller observes of a backfill, and how: the input of reconcile().

- JobObs, PodObs, WaitingPod: the few fields of a Job or Pod that reconcile() reads, parsed
  from the API's JSON here and nowhere else (kubeclient returns them);
- Backfill: all the controller keeps of one backfill between rounds;
- Observer: the reads that complete what the watches say, and Observed, the snapshot of it all
  that one reconcile() decides on.

Pods are not watched: a backfill needs a Pod only for what its worker said once its Job has
finished (the staging result, a failure message), so the Pods of that one Job are read then
(read_pods). A watch would send every Pod of every transport Job, and kopf keeps memory per
watched object until it is deleted. Pods that do not start are looked for only while a current
Job has Pods not running (read_waiting), with one list per namespace for all its backfills.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson

from beam_contract.model import TERMINAL, BackfillStatus, Phase, parse_timestamp

from . import child_jobs, staged_files
from .config import OperatorConfig

log = logging.getLogger("beam_operator.controller")

Key = tuple[str, str]  # namespace, name

_FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


def _attempt_label(value: str | None) -> int:
    return int(value) if value and value.isdigit() and int(value) > 0 else 1


@dataclass(frozen=True)
class JobObs:
    """What the operator needs of a child Job's status."""

    name: str
    kind: str  # a child_jobs.JobKind (label LABEL_KIND), or "" for a Job without the label
    complete: bool = False
    failed: bool = False
    failure_reason: str = ""
    failure_message: str = ""
    completed_indexes: str = ""
    failed_indexes: str = ""
    active: int = 0
    deleting: bool = False
    finished_at: str = ""
    ready: int = 0  # Pods whose container runs (workers have no readiness probe)
    created_at: str = ""
    suspended: bool = False  # the Job's spec.suspend
    attempt: int = 1  # label LABEL_ATTEMPT; Jobs from before retries existed have none
    queued: bool = False  # it has Kueue's queue-name label: Kueue, not the operator, unsuspends it
    completions: int = 0  # spec.completions; of a transport Job, how many workers share the chunks

    @classmethod
    def from_job(cls, job: dict[str, Any]) -> JobObs:
        meta, status = job.get("metadata", {}), job.get("status") or {}
        conds = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
        failed = conds.get("Failed") or conds.get("FailureTarget")
        return cls(
            name=meta.get("name", ""),
            kind=(meta.get("labels") or {}).get(child_jobs.LABEL_KIND, ""),
            # SuccessCriteriaMet/FailureTarget come before Complete/Failed while Pods wind down;
            # acting on them saves a round of Pod termination.
            complete=bool(conds.get("Complete") or conds.get("SuccessCriteriaMet")),
            failed=bool(failed),
            failure_reason=(failed or {}).get("reason", ""),
            failure_message=(failed or {}).get("message", ""),
            completed_indexes=status.get("completedIndexes") or "",
            failed_indexes=status.get("failedIndexes") or "",
            active=status.get("active") or 0,
            ready=status.get("ready") or 0,
            created_at=meta.get("creationTimestamp") or "",
            deleting=bool(meta.get("deletionTimestamp")),
            suspended=bool((job.get("spec") or {}).get("suspend")),
            completions=(job.get("spec") or {}).get("completions") or 0,
            queued=child_jobs.QUEUE_NAME_LABEL in (meta.get("labels") or {}),
            attempt=_attempt_label((meta.get("labels") or {}).get(child_jobs.LABEL_ATTEMPT)),
            finished_at=status.get("completionTime")
            or next(
                (
                    c.get("lastTransitionTime")
                    for t, c in conds.items()
                    if t in _FINISHED and c.get("lastTransitionTime")
                ),
                "",
            ),
        )


@dataclass(frozen=True)
class PodObs:
    """A finished Pod of a child Job: its exit and what the worker said."""

    job: str
    index: int | None
    succeeded: bool
    exit_code: int | None
    message: str
    finished_at: str = ""
    name: str = ""
    reason: str = ""  # the container's termination reason: Error, OOMKilled, ...

    @classmethod
    def from_pod(cls, pod: dict[str, Any]) -> PodObs | None:
        meta, status = pod.get("metadata", {}), pod.get("status") or {}
        phase = status.get("phase")
        if phase not in ("Succeeded", "Failed"):
            return None
        term: dict[str, Any] = {}
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated") or {}
        idx = (meta.get("annotations") or {}).get("batch.kubernetes.io/job-completion-index")
        return cls(
            job=(meta.get("labels") or {}).get("job-name")
            or (meta.get("labels") or {}).get("batch.kubernetes.io/job-name", ""),
            index=int(idx) if idx is not None and idx.isdigit() else None,
            succeeded=phase == "Succeeded",
            exit_code=term.get("exitCode"),
            message=(term.get("message") or status.get("message") or "").strip(),
            finished_at=term.get("finishedAt") or "",
            name=meta.get("name", ""),
            reason=term.get("reason") or "",
        )


@dataclass(frozen=True)
class WaitingPod:
    """A worker Pod that does not start, for a reason that does not pass by itself; or, with
    pod "", a Job whose Pods the cluster refuses to create (its FailedCreate Event)."""

    job: str
    pod: str
    reason: str
    message: str
    since: str  # ISO 8601: waiting since


# Why a Pod waits, and what the user can do about it.
STUCK_HINTS = {
    "ErrImagePull": "the worker image cannot be pulled: check jobrunner.image in the operator's values and "
    "that the nodes can reach its registry",
    "ImagePullBackOff": "the worker image cannot be pulled: check jobrunner.image in the operator's values and "
    "that the nodes can reach its registry",
    "ErrImageNeverPull": "the worker image is not on the node and its pull policy is Never: load the image or "
    "change jobrunner.image.pullPolicy",
    "InvalidImageName": "the worker image name is invalid: check jobrunner.image in the operator's values",
    "CreateContainerConfigError": "a Secret or ConfigMap the Pod needs is missing or lacks a key",
    "Unschedulable": "no node can run it: ask for less in spec.resources, or check the nodes' capacity, "
    "taints and the static egress node selector (a full cluster: config.unschedulable_seconds)",
    "FailedCreate": "the cluster refuses to create its Pods: check the namespace's ResourceQuotas, "
    "LimitRanges and admission policies",
}
# How often a backfill whose Pods are not all running is looked at again for stuck Pods.
STUCK_RECHECK_S = 15.0
# ...and whose stuck Pods only wait for room on a node: listed every STUCK_RECHECK_S, a burst
# of backfills queued for a full cluster made most of the operator's Pod lists, for a reason
# that gets config.unschedulable_seconds (an hour) anyway (docs/benchmarks.md, "Finished
# backfills expiring", "Found on the way, then changed").
UNSCHEDULABLE_RECHECK_S = 60.0
# How long one list of a namespace's waiting worker Pods serves its backfills' stuck-Pod checks.
PENDING_PODS_TTL_S = 5.0


def waiting_of(job: str, pod: dict[str, Any]) -> WaitingPod | None:
    """Why a Pending Pod does not start, if it is a reason of STUCK_HINTS."""
    meta, status = pod.get("metadata", {}), pod.get("status") or {}
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK_HINTS:
            return WaitingPod(
                job,
                meta.get("name", ""),
                waiting["reason"],
                waiting.get("message") or "",
                meta.get("creationTimestamp") or "",
            )
    for c in status.get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
            since = c.get("lastTransitionTime") or meta.get("creationTimestamp") or ""
            return WaitingPod(job, meta.get("name", ""), "Unschedulable", c.get("message") or "", since)
    return None


def owner_job_name(pod: dict[str, Any]) -> str | None:
    """The Job that controls the Pod, by its ownerReference (a label is anyone's to write)."""
    refs = (pod.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller") and r.get("kind") == "Job"), {}).get("name")


LOST_POD_S = 120  # beyond any worker's grace period: a Pod still terminating is on a lost node


def pod_may_write(pod: dict[str, Any], now: datetime) -> bool:
    """Whether a worker Pod could still write to the staged prefix: not finished, and not
    terminating for longer than any grace period (a lost node never confirms the end; the Pod
    garbage collector removes it once the Node is deleted). A Pod whose Job is gone (deleted
    with --cascade=orphan) counts while it runs: it ends by itself, and then no longer counts."""
    if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return False
    deleting = (pod.get("metadata") or {}).get("deletionTimestamp")
    if deleting:
        since = datetime.fromisoformat(deleting.replace("Z", "+00:00"))
        return (now - since).total_seconds() < LOST_POD_S
    return True


@dataclass(frozen=True)
class Observed:
    name: str
    namespace: str
    uid: str
    generation: int
    creation_timestamp: str
    spec: dict[str, Any]
    status: BackfillStatus
    jobs: tuple[JobObs, ...] = ()
    pods: tuple[PodObs, ...] = ()
    # Job creates refused for good (400, 403, 404, 422), by Job kind: the apiserver's answer.
    refused: dict[str, str] = field(default_factory=dict)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Kueue's queue-name label of the backfill, copied to its Jobs (docs/operations.md, "Kueue").
    queue_name: str = ""
    # Whether the staged manifest is still in the bucket; read only when a retry is asked for
    # (wants_retry), None otherwise.
    staged: bool | None = None
    # Pods of the current Jobs that wait for a reason in STUCK_HINTS (read when a Job's Pods are
    # not all running after stuck_pod_seconds).
    waiting: tuple[WaitingPod, ...] = ()
    # Chunks whose progress object says they reached every destination (beam_contract.staging),
    # each with the rows its custom metadata names (None if it names none), read from the bucket
    # while transport workers have more than one chunk each; None if unread.
    progress: Mapping[int, int | None] | None = None
    # Of a backfill not yet started: how many live backfills its namespace held before it (by
    # creation), their specs' bytes, and its own spec's bytes; None once it has started.
    namespace_load: tuple[int, int, int] | None = None


def running(job: JobObs) -> bool:
    return bool(job.active) or not (job.complete or job.failed)


def current_jobs(obs: Observed, st: BackfillStatus) -> list[JobObs]:
    attempt = st.attempt or 1
    return [j for j in obs.jobs if j.attempt == attempt and not j.deleting]


def workers_share_chunks(job: JobObs | None, num_chunks: int | None) -> bool:
    """Whether some transport worker delivers more than one chunk: only then does the Job's
    status say less than the progress objects do."""
    return job is not None and num_chunks is not None and 0 < job.completions < num_chunks


def stuck_recheck_after(waiting: tuple[WaitingPod, ...], now: datetime, config: OperatorConfig) -> float:
    """Seconds until a backfill's Pods are listed again for stuck ones, after `waiting` was found.

    Only Unschedulable Pods: up to UNSCHEDULABLE_RECHECK_S, never past the moment the first would
    reach unschedulable_seconds. A Pod that is then scheduled and cannot pull its image counts
    from its creation, so it fails at that next look: at most UNSCHEDULABLE_RECHECK_S late."""
    if not waiting or any(w.reason != "Unschedulable" for w in waiting):
        return STUCK_RECHECK_S
    first = min(
        config.unschedulable_seconds - ((now - parse_timestamp(w.since)).total_seconds() if w.since else 0.0)
        for w in waiting
    )
    return max(STUCK_RECHECK_S, min(UNSCHEDULABLE_RECHECK_S, first))


# --- the cached backfill ------------------------------------------------------------------

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
# cached spec holds only the first of its filter values (the controller reads the whole spec
# again before it builds a Job from it).
SPEC_BYTES = "beam/spec-bytes"
SLIMMED = "beam/filter-slimmed"
SLIM_FILTER_BYTES = 4096


def slim(body: dict[str, Any]) -> dict[str, Any]:
    """What reconcile() and the Events read of a BeamBackfill, nothing more.

    A full body carries managedFields (one entry per writer) and kopf's annotations (a copy of
    the spec): kilobytes of JSON, ten times that as Python objects, times every backfill. A
    filter of thousands of values is kept as its first value only: reconcile() needs all of them
    only to build a Job, and then the controller reads them again, so that the memory a cached
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


@dataclass
class Backfill:
    """All the controller keeps of one backfill between rounds; its DELETED event drops it whole.

    Its Jobs are not here: they are the Job watch's cache, by owner, since a Job may be seen
    before its backfill (a restarted operator lists both at once).
    """

    body: dict[str, Any]  # slim()
    # Finished Pods of its Jobs, by name: what their workers said (read_pods).
    pods: dict[str, PodObs] = field(default_factory=dict)
    # Stuck Pods of its running Jobs, and when to look for them again (monotonic; read_waiting).
    waiting: tuple[float, tuple[WaitingPod, ...]] | None = None
    # Chunks with a progress object in the bucket, each with the rows its metadata names, and
    # when to read again (monotonic): only while transport workers have more than one chunk
    # each (read_progress).
    progress: tuple[float, dict[int, int | None]] | None = None
    # Job creates the apiserver refused for good, by Job kind: the next round ends the backfill
    # `failed` with the apiserver's reason.
    refused: dict[str, str] = field(default_factory=dict)
    # Whether this process has created or found its staged-data key Secret.
    keyed: bool = False
    # When it last moved (a status change or a chunk delivered, monotonic): the stall gauge.
    progress_at: float | None = None

    @property
    def uid(self) -> str:
        return self.body["metadata"]["uid"]

    @property
    def status(self) -> str:
        """Its status as cached: "" before its first round."""
        return (self.body.get("status") or {}).get("status") or ""


# --- the reads ------------------------------------------------------------------------------


class Reads(Protocol):
    """The API reads that return observations (kubeclient.KubeApi)."""

    async def finished_pods(self, namespace: str, job_name: str) -> dict[str, PodObs]: ...
    async def pending_pods(self, namespace: str) -> dict[str, list[WaitingPod]]: ...
    async def failed_create(self, namespace: str, job: JobObs) -> list[WaitingPod]: ...
    async def live_children(self, namespace: str, uid: str) -> tuple[list[JobObs], int]: ...


class Observer:
    """What one reconcile() sees of a backfill: its cached body and Jobs (the watches), and what
    the reads here add to its Backfill record. Each read is made only when the backfill's state
    asks for it, and no more often than its own interval."""

    def __init__(
        self,
        config: OperatorConfig,
        api: Reads,
        backfills: Mapping[Key, Backfill],
        jobs: Mapping[tuple[str, str], Mapping[str, JobObs]],
    ) -> None:
        self.config = config
        self.api = api
        self._backfills = backfills
        self._jobs = jobs  # by (namespace, owner uid), then Job name: the Job watch's cache
        # Waiting worker Pods by namespace: when listed, and the list (_pending_pods).
        self._pending: dict[str, tuple[float, asyncio.Future[dict[str, list[WaitingPod]]]]] = {}

    def _record(self, body: dict[str, Any]) -> Backfill | None:
        """The record of the backfill `body` is a version of, if it is still the one cached."""
        meta = body["metadata"]
        rec = self._backfills.get((meta["namespace"], meta["name"]))
        return rec if rec is not None and rec.uid == meta["uid"] else None

    async def read(self, body: dict[str, Any]) -> Observed:
        """The reads this backfill needs now, then what reconcile() is to see."""
        await self.read_pods(body)
        await self.read_waiting(body)
        await self.read_progress(body)
        return self.observed(body)

    def observed(self, body: dict[str, Any], now: datetime | None = None) -> Observed:
        meta = body["metadata"]
        uid = meta["uid"]
        rec = self._record(body) or Backfill(body)
        return Observed(
            name=meta["name"],
            namespace=meta["namespace"],
            uid=uid,
            generation=meta.get("generation", 1),
            creation_timestamp=meta.get("creationTimestamp", ""),
            spec=body.get("spec") or {},
            status=BackfillStatus.model_validate(body.get("status") or {}),
            jobs=tuple(self._jobs.get((meta["namespace"], uid), {}).values()),
            pods=tuple(rec.pods.values()),
            refused=dict(rec.refused),
            waiting=rec.waiting[1] if rec.waiting else (),
            progress=rec.progress[1] if rec.progress else None,
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
        for (other_ns, name), other in self._backfills.items():
            if other_ns != ns or name == meta["name"]:
                continue
            m = other.body["metadata"]
            if (m.get("creationTimestamp") or "", name) >= mine or m.get("deletionTimestamp"):
                continue
            if other.status in TERMINAL:
                continue
            live += 1
            spec_bytes += m.get(SPEC_BYTES, 0)
        return live, spec_bytes, meta.get(SPEC_BYTES, 0)

    def _needs_pods(self, ns: str, uid: str, status: str, pods: list[PodObs]) -> list[str]:
        """Finished Jobs of this backfill whose Pods reconcile() will read but has not got."""
        need = []
        for job in self._jobs.get((ns, uid), {}).values():
            if job.failed:
                if not any(p.job == job.name and not p.succeeded and p.message for p in pods):
                    need.append(job.name)
            elif job.complete and job.kind == child_jobs.STAGING and status in ("", Phase.STAGING):
                # Once transporting, the chunk count is in the status: a restarted operator
                # must not read every staging Pod again.
                if not any(p.job == job.name and p.succeeded and p.message for p in pods):
                    need.append(job.name)
        return need

    async def read_pods(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        status = (body.get("status") or {}).get("status") or ""
        rec = self._record(body)
        if status in TERMINAL or rec is None:
            return
        for job_name in self._needs_pods(meta["namespace"], meta["uid"], status, list(rec.pods.values())):
            rec.pods.update(await self.api.finished_pods(meta["namespace"], job_name))

    async def read_waiting(self, body: dict[str, Any]) -> None:
        """Look for stuck Pods of a backfill whose current Jobs have Pods not running, once those
        Jobs are stuck_pod_seconds old, and then every STUCK_RECHECK_S (less often for Pods that
        only wait for a node, stuck_recheck_after): no watch of Pods, and no list at all for the
        common case of Jobs whose Pods all run."""
        rec = self._record(body)
        if rec is None:
            return
        namespace = body["metadata"]["namespace"]
        status = BackfillStatus.model_validate(body.get("status") or {})
        if status.status not in (Phase.STAGING, Phase.TRANSPORTING):
            rec.waiting = None
            return
        now, wall = time.monotonic(), datetime.now(UTC)
        candidates = [
            j
            for j in current_jobs(self.observed(body), status)
            if running(j)
            and not j.suspended
            and j.ready < max(j.active, 1)
            and j.created_at
            and (wall - parse_timestamp(j.created_at)).total_seconds()
            >= min(self.config.stuck_pod_seconds, self.config.unschedulable_seconds)
        ]
        if not candidates:
            rec.waiting = None
            return
        if rec.waiting is not None and now < rec.waiting[0]:
            return
        pending = await self._pending_pods(namespace)
        found: list[WaitingPod] = []
        for job in candidates:
            waiting = pending.get(job.name, [])
            if not waiting and not job.active:
                waiting = await self.api.failed_create(namespace, job)
            found += waiting
        # 1 s early: reconcile() wakes the backfill every STUCK_RECHECK_S, and that wake must list.
        rec.waiting = (now + stuck_recheck_after(tuple(found), wall, self.config) - 1, tuple(found))

    async def _pending_pods(self, namespace: str) -> dict[str, list[WaitingPod]]:
        """A namespace's waiting worker Pods, by Job: one list for every backfill of the
        namespace that looks within PENDING_PODS_TTL_S of the last one (rounds at the same
        moment share the list in flight). Listed per backfill, a burst queued for a full node
        cost several Pod lists each (docs/benchmarks.md, "Workers instead of Pods per chunk")."""
        now = time.monotonic()
        hit = self._pending.get(namespace)
        if hit is None or now - hit[0] > PENDING_PODS_TTL_S or (hit[1].done() and hit[1].exception()):
            if len(self._pending) > 256:  # namespaces no backfill looked at lately
                self._pending = {ns: v for ns, v in self._pending.items() if now - v[0] <= PENDING_PODS_TTL_S}
            hit = self._pending[namespace] = (now, asyncio.ensure_future(self.api.pending_pods(namespace)))
        return await asyncio.shield(hit[1])

    async def read_progress(self, body: dict[str, Any]) -> None:
        """Count delivered chunks (and their rows: rows_delivered) from the bucket while transport
        workers have more than one chunk each: the Job's status only says when a worker has
        delivered all of its chunks.

        One listing per backfill at most every progress_interval_seconds, and no more than
        progress_reads_per_second over all of them: with more backfills transporting, each one's
        count is read less often (Job completions still count at once). A failed read leaves the
        last count: chunks_left only goes down later, rows_delivered only up, nothing else
        depends on them. A backfill staging (again, after a retry) drops what was read: those
        objects belong to chunks it stages anew."""
        rec = self._record(body)
        if rec is None:
            return
        meta = body["metadata"]
        status = BackfillStatus.model_validate(body.get("status") or {})
        if status.status in (Phase.COMPLETED, Phase.CANCELLED, Phase.STAGING):
            rec.progress = None
            return
        jobs = current_jobs(self.observed(body), status) if status.status == Phase.TRANSPORTING else []
        transport = next((j for j in jobs if j.kind == child_jobs.TRANSPORT), None)
        if not (
            transport is not None
            and running(transport)
            and not transport.suspended
            and workers_share_chunks(transport, status.num_chunks)
        ):
            return
        now = time.monotonic()
        last = rec.progress
        if last is not None and now < last[0]:
            return
        reading = sum(1 for b in self._backfills.values() if b.progress is not None and b.progress[0] > now - 60) + 1
        interval = max(self.config.progress_interval_seconds, reading / self.config.progress_reads_per_second)
        uri = child_jobs.staging_uri(self.config, meta["namespace"], meta["uid"])
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
        rec.progress = (now + interval - 0.05, found)
