"""The reconcile logic as a pure function: what was observed in, the next status and actions out.

Nothing here talks to Kubernetes. handlers.py feeds it the BeamBackfill and the Jobs and Pods
it owns (from watch caches), then carries out the actions and writes the status. Because the
input is only what can be observed, an operator that restarts mid-phase computes the same
decision again, and deterministic Job names turn a repeated create into AlreadyExists.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import ValidationError

from beam_contract.addresses import endpoint, literal_refusal
from beam_contract.model import BackfillSpec, BackfillStatus, Condition, Phase, parse_timestamp, utc_iso, workflow_id
from beam_contract.worker import SPEC_CONFIGMAP_MAX_BYTES, StagingResult, parse_failure, worker_chunks

from . import child_jobs
from .config import OperatorConfig

KAFKA_TOPIC_MAX_LENGTH = 249

MAX_ERROR = 1024
# What a WorkerLog Event quotes of a failed worker's last lines.
MAX_EVENT_MESSAGE = 1024  # what the Event recorder keeps of a message (kubeclient.py)
# Job and Pod watches are separate streams: a Job can be seen finished before its Pod's
# termination message arrives. Wait this long for the message before deciding without it.
POD_MESSAGE_GRACE_S = 15.0


_FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


@dataclass(frozen=True)
class JobObs:
    """What the operator needs of a child Job's status."""

    name: str
    phase: str  # a child_jobs.JobKind, or "" for a Job without the label
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
            phase=(meta.get("labels") or {}).get(child_jobs.LABEL_PHASE, ""),
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
# ...and whose stuck Pods only wait for room on a node: a burst of backfills queued for a full
# cluster was listed again every 15 s, about 19,400 of 22,268 Pod lists at 1,000 backfills
# (docs/benchmarks.md), for a reason that gets config.unschedulable_seconds (an hour) anyway.
UNSCHEDULABLE_RECHECK_S = 60.0


def _attempt_label(value: str | None) -> int:
    return int(value) if value and value.isdigit() and int(value) > 0 else 1


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


@dataclass(frozen=True)
class CreateJob:
    manifest: dict[str, Any]
    # The spec's ConfigMap, for a spec too large for the env: created (or found) before the Job.
    config_map: dict[str, Any] | None = None
    # The backfill's staged-data key Secret, without its key (the controller draws one): created
    # before the first Job, found (and kept) before every later one.
    key_secret: dict[str, Any] | None = None


@dataclass(frozen=True)
class DeleteJob:
    name: str


@dataclass(frozen=True)
class DeleteBackfill:
    """The backfill's time to live after it ended has passed: delete it (the finalizer cleans up)."""


@dataclass(frozen=True)
class SuspendJob:
    """Set a Job's spec.suspend: true ends its Pods, false lets it go on where it stopped."""

    name: str
    suspend: bool


@dataclass(frozen=True)
class DeleteStaged:
    uri: str


Action = CreateJob | DeleteJob | DeleteStaged | SuspendJob | DeleteBackfill


@dataclass(frozen=True)
class Event:
    type: str  # Normal or Warning
    reason: str
    message: str


@dataclass
class Decision:
    status: BackfillStatus
    actions: list[Action] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    @property
    def transition(self) -> bool:
        return any(e.reason in TRANSITION_REASONS for e in self.events)


def _reason(phase: Phase) -> str:
    """The Event reason of a transition into `phase`: Staging, Transporting, Completed..."""
    return phase.value.capitalize()


TRANSITION_REASONS = frozenset({_reason(p) for p in Phase} | {"Retrying"})


def first_index(ranges: str) -> int | None:
    part = next(iter(filter(None, ranges.split(","))), None)
    return int(part.partition("-")[0]) if part else None


def indexes(ranges: str) -> list[int]:
    """ "0-3,5" -> [0, 1, 2, 3, 5]."""
    out: list[int] = []
    for part in filter(None, ranges.split(",")):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def chunks_delivered(job: JobObs | None, num_chunks: int, progress: Iterable[int] | None) -> int:
    """Chunks that reached every destination: those of the transport workers that completed,
    and those with a progress object (a worker that has more to do, or an earlier attempt)."""
    done = set(progress or ())
    if job is not None:
        workers = job.completions or num_chunks  # a Job without completions cannot have completed any
        for worker in indexes(job.completed_indexes):
            done.update(worker_chunks(worker, workers, num_chunks))
    return len({c for c in done if 0 <= c < num_chunks})


def rows_listed(progress: Mapping[int, int | None] | None, num_chunks: int, num_rows: int | None) -> int | None:
    """Rows of the chunks whose progress object was listed, as their metadata names them (a
    chunk whose object names none counts 0), at most num_rows; None if nothing was listed."""
    if not isinstance(progress, Mapping):
        return None
    total = sum(r for c, r in progress.items() if 0 <= c < num_chunks and isinstance(r, int) and r > 0)
    return total if num_rows is None else min(total, num_rows)


def _count_rows(st: BackfillStatus, progress: Mapping[int, int | None] | None) -> None:
    """rows_delivered of a transporting backfill: what the progress objects listed, never less
    than it was (a delivered chunk stays delivered; a listing not read keeps the last count)."""
    listed = rows_listed(progress, st.num_chunks or 0, st.num_rows) or 0
    st.rows_delivered = max(st.rows_delivered or 0, listed)


def workers_share_chunks(job: JobObs | None, num_chunks: int | None) -> bool:
    """Whether some transport worker delivers more than one chunk: only then does the Job's
    status say less than the progress objects do."""
    return job is not None and num_chunks is not None and 0 < job.completions < num_chunks


def _clip(msg: str) -> str:
    msg = " ".join(msg.split())
    return msg if len(msg) <= MAX_ERROR else msg[: MAX_ERROR - 1] + "…"


def _set_condition(st: BackfillStatus, type_: str, status: bool, reason: str, message: str, now: str, gen: int) -> None:
    value = "True" if status else "False"
    old = next((c for c in st.conditions if c.type == type_), None)
    ltt = old.lastTransitionTime if old and old.status == value and old.lastTransitionTime else now
    new = Condition(
        type=type_, status=value, reason=reason, message=_clip(message), lastTransitionTime=ltt, observedGeneration=gen
    )
    st.conditions = sorted([c for c in st.conditions if c.type != type_] + [new], key=lambda c: c.type)


def _failed_pods(pods: tuple[PodObs, ...], job: str, index: int | None) -> list[PodObs]:
    failed = [p for p in pods if p.job == job and not p.succeeded and (index is None or p.index == index)]
    return sorted(failed, key=lambda p: p.finished_at)


def _worker_message(pods: tuple[PodObs, ...], job: str, index: int | None = None) -> tuple[str, int | None]:
    """The error of the most recent termination message of a failed Pod of `job` (and index),
    and the chunk it names (a transport worker's)."""
    failed = _failed_pods(pods, job, index)
    for p in reversed(failed):
        if p.message:
            error, chunk, _ = parse_failure(p.message)
            return error, chunk
    if failed and failed[-1].reason == "OOMKilled":
        return (
            f"worker {failed[-1].name} was killed for using more memory than its limit (OOMKilled, exit code "
            f"{failed[-1].exit_code}); raise spec.resources.limits.memory, within the operator's max_worker_resources"
        ), None
    if failed and failed[-1].exit_code is not None:
        return f"worker exited with code {failed[-1].exit_code} and no message", None
    return "", None


def _worker_log(pods: tuple[PodObs, ...], job: str, index: int | None, where: str) -> list[Event]:
    """An Event with the failed worker's last log lines (its termination message after the
    mark), which outlives the Pod and its logs; none if it sent no lines."""
    for p in reversed(_failed_pods(pods, job, index)):
        _, _, lines = parse_failure(p.message)
        if lines:
            head = f"{where}, pod {p.name}, last log lines: "
            text = " | ".join(lines)
            room = MAX_EVENT_MESSAGE - len(head)
            if len(text) > room:
                text = "…" + text[-(room - 1) :]  # the newest lines matter most
            return [Event("Warning", "WorkerLog", head + text)]
    return []


def reconcile(obs: Observed, config: OperatorConfig) -> Decision:
    d = _reconcile(obs, config)
    if d.status.status in (Phase.STAGING, Phase.TRANSPORTING) and (wake := _next_look(obs, d.status, config)):
        d.requeue_after = wake if d.requeue_after is None else min(d.requeue_after, wake)
    return d


def current_jobs(obs: Observed, st: BackfillStatus) -> list[JobObs]:
    attempt = st.attempt or 1
    return [j for j in obs.jobs if j.attempt == attempt and not j.deleting]


def _next_look(obs: Observed, st: BackfillStatus, config: OperatorConfig) -> float | None:
    """When to look again without a watch event: at the deadline, and while Pods do not run."""
    wake = []
    if (deadline := _deadline(obs, st, config)) is not None:
        wake.append(max((deadline - obs.now).total_seconds(), 0.0))
    jobs = current_jobs(obs, st)
    if any(running(j) and not j.suspended and j.ready < max(j.active, 1) for j in jobs):
        wake.append(STUCK_RECHECK_S)
    if st.status == Phase.TRANSPORTING and (
        transport := next((j for j in jobs if j.phase == child_jobs.TRANSPORT), None)
    ):
        if running(transport) and not transport.suspended and workers_share_chunks(transport, st.num_chunks):
            wake.append(config.progress_interval_seconds)  # chunks_left from the progress objects
    return min(wake) if wake else None


def _deadline(obs: Observed, st: BackfillStatus, config: OperatorConfig) -> datetime | None:
    seconds = (obs.spec or {}).get("active_deadline_seconds") or config.default_active_deadline_seconds
    if not isinstance(seconds, int):
        return None
    started = st.time_created or obs.creation_timestamp
    if (st.attempt or 1) > 1:  # from the retry: the Failed condition turned False then
        started = next((c.lastTransitionTime for c in st.conditions if c.type == "Failed"), None) or started
    return parse_timestamp(started) + timedelta(seconds=seconds) if started else None


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


def stuck_pods(obs: Observed, config: OperatorConfig) -> str:
    """Why a current Pod is stuck for longer than stuck_pod_seconds, and what to do, or ""."""
    for w in obs.waiting:
        waited = (obs.now - parse_timestamp(w.since)).total_seconds() if w.since else 0.0
        limit = config.unschedulable_seconds if w.reason == "Unschedulable" else config.stuck_pod_seconds
        if waited >= limit and w.reason in STUCK_HINTS:
            what = f"Pod {w.pod}" if w.pod else f"Job {w.job}"
            detail = f": {_clip(w.message)[:300]}" if w.message else ""
            return f"{what} has been waiting {waited:.0f}s: {w.reason}{detail}; {STUCK_HINTS[w.reason]}"
    return ""


def _reconcile(obs: Observed, config: OperatorConfig) -> Decision:
    st = obs.status.model_copy(deep=True)
    now = utc_iso(obs.now)
    events: list[Event] = []
    actions: list[Action] = []
    retrying = _retry(obs, st, events, now)
    attempt = st.attempt or 1
    # A retry's Jobs are the current attempt's; earlier attempts' finished Jobs stay until their TTL.
    by_phase = {j.phase: j for j in obs.jobs if j.attempt == attempt}

    def finish(
        phase: Phase, reason: str, message: str, *, warning: bool = False, cleanup_jobs: bool = False
    ) -> Decision:
        st.status = phase
        st.time_completed = st.time_completed or now
        if phase == Phase.FAILED:
            st.error_message = _clip(message)
        failed, completed = phase == Phase.FAILED, phase == Phase.COMPLETED
        if completed and st.num_rows is not None:
            st.rows_delivered = st.num_rows  # every chunk reached every destination
        _set_condition(st, "Failed", failed, reason, message if failed else "", now, obs.generation)
        _set_condition(st, "Complete", completed, reason, message if completed else "", now, obs.generation)
        if phase == Phase.CANCELLED:
            _set_condition(st, "Cancelled", True, reason, message, now, obs.generation)
        if cleanup_jobs:
            actions.extend(
                DeleteJob(j.name) for j in obs.jobs if not j.deleting and (phase == Phase.CANCELLED or running(j))
            )
        events.append(Event("Warning" if warning else "Normal", _reason(phase), message))
        if completed and config.staged_retention_seconds == 0 and st.num_chunks is not None:
            actions.append(DeleteStaged(child_jobs.staging_uri(config, obs.namespace, obs.uid)))
            st.staged_files_deleted = True
        elif completed and st.num_chunks is not None:
            return Decision(st, actions, events, requeue_after=float(config.staged_retention_seconds))
        return Decision(st, actions, events)

    # First sight: identity fields the public API reports.
    if st.status is None:
        st = BackfillStatus(
            status=Phase.STAGING,
            job_id=obs.uid,
            workflow_id=workflow_id(obs.namespace, obs.uid),
            time_created=obs.creation_timestamp or now,
            conditions=st.conditions,
        )
        _set_condition(st, "Staged", False, "Staging", "exporting the window from Snowflake", now, obs.generation)
        events.append(Event("Normal", _reason(Phase.STAGING), "exporting the window from Snowflake to staging"))
    st.observedGeneration = obs.generation

    if st.status.terminal:
        return _terminal(obs, st, config, actions, events)
    if st.status == Phase.TRANSPORTING:
        _count_rows(st, obs.progress)

    # Checks the CRD cannot do: they depend on the operator's configuration.
    try:
        spec = BackfillSpec.model_validate(obs.spec)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return finish(
            Phase.FAILED, "InvalidSpec", f"invalid spec: {loc}: {first['msg']}", warning=True, cleanup_jobs=True
        )
    if spec.cancel:
        return finish(Phase.CANCELLED, "Cancelled", "cancelled by request (spec.cancel)", cleanup_jobs=True)
    for dest in spec.destinations:
        for field_name in ("secret", "hash_key"):
            secret = getattr(dest, field_name, None)
            if secret and not config.destination_secret_allowed(secret):
                return finish(
                    Phase.FAILED,
                    "SecretNotAllowed",
                    f"{dest.type} destination '{dest.name}': {field_name} {secret!r} is not a destination Secret; "
                    f"destinations may only name Secrets whose name starts with {config.destination_secret_prefix!r}, "
                    "which an administrator provisions for them (docs/security.md)",
                    warning=True,
                    cleanup_jobs=True,
                )
    for dest in spec.destinations:
        if dest.type == "sns" and not dest.secret and obs.namespace not in config.ambient_identity_namespaces:
            return finish(
                Phase.FAILED,
                "AmbientIdentityOff",
                f"sns destination '{dest.name}' has no secret, and the workers' own cloud identity is not enabled "
                f"for organization {obs.namespace}; name a destination Secret with aws_access_key_id and "
                "aws_secret_access_key, or ask your administrator to add the organization to "
                "config.ambient_identity_namespaces",
                warning=True,
                cleanup_jobs=True,
            )
    if why := _beyond_bounds(spec, config):
        return finish(Phase.FAILED, "ResourcesNotAllowed", why, warning=True, cleanup_jobs=True)
    if why := _inward_literal(spec, config):
        return finish(Phase.FAILED, "DestinationNotAllowed", why, warning=True, cleanup_jobs=True)
    for dest in spec.destinations:
        if dest.type == "kafka" and len(topic := dest.topic_in(obs.namespace)) > KAFKA_TOPIC_MAX_LENGTH:
            room = KAFKA_TOPIC_MAX_LENGTH - len(obs.namespace) - 1
            return finish(
                Phase.FAILED,
                "TopicTooLong",
                f"kafka destination '{dest.name}': on the managed Kafka its topic is {topic[:40]}... "
                f"(<namespace>.<name>), {len(topic)} characters, more than Kafka's {KAFKA_TOPIC_MAX_LENGTH}; "
                f"in this namespace a name may have at most {room}",
                warning=True,
                cleanup_jobs=True,
            )
    for kind, why in ({} if retrying else obs.refused).items():
        return finish(
            Phase.FAILED,
            "JobRefused",
            f"the cluster refused the {kind} Job: {why}",
            warning=True,
            cleanup_jobs=True,
        )
    if why := _namespace_full(obs, config):
        return finish(Phase.FAILED, "NamespaceFull", why, warning=True, cleanup_jobs=True)
    if not config.table_allowed(spec.table):
        allowed = ", ".join(config.allowed_tables)
        return finish(
            Phase.FAILED,
            "TableNotAllowed",
            f"table {spec.table} is not allowed by this operator; allowed tables: {allowed}",
            warning=True,
            cleanup_jobs=True,
        )
    if spec.static_egress_ip and not config.egress.configured:
        return finish(
            Phase.FAILED,
            "NoStaticEgress",
            "static_egress_ip is true but this operator has no static egress configured (egress.podLabels, nodeSelector or tolerations in the chart's values); "
            "set static_egress_ip: false or ask your administrator to configure egress",
            warning=True,
            cleanup_jobs=True,
        )

    def create(manifest: dict[str, Any]) -> CreateJob:
        key = child_jobs.staging_key_secret(obs.name, obs.namespace, obs.uid)
        if child_jobs.spec_travels_inline(spec):
            return CreateJob(manifest, key_secret=key)
        return CreateJob(manifest, child_jobs.spec_config_map(obs.name, obs.namespace, obs.uid, spec), key)

    deadline = _deadline(obs, st, config)
    if deadline is not None and obs.now >= deadline:
        seconds = (obs.spec or {}).get("active_deadline_seconds") or config.default_active_deadline_seconds
        if st.status == Phase.TRANSPORTING:
            num = st.num_chunks or 0
            st.chunks_left = num - chunks_delivered(by_phase.get(child_jobs.TRANSPORT), num, obs.progress)
        where = f"{st.chunks_left} of {st.num_chunks} chunks left" if st.status == Phase.TRANSPORTING else "staging"
        return finish(
            Phase.FAILED,
            "DeadlineExceeded",
            f"the backfill ran past its active_deadline_seconds ({seconds}s) with {where}; raise "
            "spec.active_deadline_seconds and retry (spec.retry) to go on from where it stopped",
            warning=True,
            cleanup_jobs=True,
        )
    if stuck := stuck_pods(obs, config):
        return finish(Phase.FAILED, "PodStuck", stuck, warning=True, cleanup_jobs=True)
    paused = _suspension(obs, st, spec, by_phase, actions, events, now)
    if paused is not None:
        return paused

    if st.status == Phase.STAGING:
        job = by_phase.get(child_jobs.STAGING)
        if job is None:
            if not child_jobs.spec_travels_inline(spec):
                size = len(child_jobs.compressed_spec(spec))
                if size > SPEC_CONFIGMAP_MAX_BYTES:
                    return finish(
                        Phase.FAILED,
                        "SpecTooLarge",
                        f"the spec is {size} bytes even gzip'd, more than the {SPEC_CONFIGMAP_MAX_BYTES} a ConfigMap "
                        "can carry to the workers; split filter.values over several backfills",
                        warning=True,
                        cleanup_jobs=True,
                    )
            actions.append(
                create(child_jobs.staging_job(obs.name, obs.namespace, obs.uid, spec, config, obs.queue_name, attempt))
            )
            st.time_staging_started = st.time_staging_started or now
            return Decision(st, actions, events)
        # The Job's own creation, if this status was not written with its create (an operator
        # that died between the two, or one from before this field).
        st.time_staging_started = st.time_staging_started or _iso_or(job.created_at, now)
        if job.failed:
            why, _ = _worker_message(obs.pods, job.name)
            if not why and _within_grace(job, obs.now):
                return Decision(st, actions, events, requeue_after=1.0)
            why = why or job.failure_message or job.failure_reason
            events.extend(_worker_log(obs.pods, job.name, None, "staging"))
            return finish(Phase.FAILED, "StagingFailed", f"staging failed: {why}", warning=True, cleanup_jobs=True)
        if not job.complete:
            return _prestart(obs, config, spec, job, by_phase, Decision(st, actions, events), create)
        result = _staging_result(obs.pods, job.name)
        if result is None and _within_grace(job, obs.now):
            return Decision(st, actions, events, requeue_after=1.0)
        if result is None:
            return finish(
                Phase.FAILED,
                "StagingFailed",
                "staging finished but reported no chunk count (no termination message from the staging Pod)",
                warning=True,
                cleanup_jobs=True,
            )
        st.num_chunks, st.num_rows, st.chunks_left = result.num_chunks, result.num_rows, result.num_chunks
        _set_condition(
            st,
            "Staged",
            True,
            "Staged",
            f"{result.num_chunks} chunks, {result.num_rows} rows staged",
            now,
            obs.generation,
        )
        if result.num_chunks == 0:
            # An empty window is a success with nothing to deliver, not an error.
            return finish(Phase.COMPLETED, "Completed", "the window holds no rows: nothing to deliver")
        st.status = Phase.TRANSPORTING
        st.time_transporting_started, st.rows_delivered = now, 0
        events.append(
            Event(
                "Normal",
                _reason(Phase.TRANSPORTING),
                f"staged {result.num_chunks} chunks ({result.num_rows} rows); delivering to {len(spec.destinations)} destination(s)",
            )
        )
        if child_jobs.TRANSPORT not in by_phase:
            actions.append(
                create(
                    child_jobs.transport_job(
                        obs.name, obs.namespace, obs.uid, spec, config, result.num_chunks, obs.queue_name, attempt
                    )
                )
            )
        return Decision(st, actions, events)

    # transporting
    num_chunks = st.num_chunks or 0
    job = by_phase.get(child_jobs.TRANSPORT)
    if job is None:
        actions.append(
            create(
                child_jobs.transport_job(
                    obs.name, obs.namespace, obs.uid, spec, config, num_chunks, obs.queue_name, attempt
                )
            )
        )
        return Decision(st, actions, events)
    st.chunks_left = max(num_chunks - chunks_delivered(job, num_chunks, obs.progress), 0)
    if job.failed:
        idx = first_index(job.failed_indexes)
        why, chunk = _worker_message(obs.pods, job.name, idx)
        if not why and _within_grace(job, obs.now):
            return Decision(st, actions, events, requeue_after=1.0)
        why = why or job.failure_message or job.failure_reason
        if chunk is None and idx is not None and job.completions == num_chunks:
            chunk = idx  # one chunk per worker: the index is the chunk
        where = f"chunk {chunk}" if chunk is not None else "a chunk"
        events.extend(_worker_log(obs.pods, job.name, idx, f"transport {where}"))
        return finish(
            Phase.FAILED,
            "TransportFailed",
            f"transport failed on {where} of {num_chunks}: {why}",
            warning=True,
            cleanup_jobs=True,
        )
    if job.complete:
        st.chunks_left = 0
        return finish(
            Phase.COMPLETED, "Completed", f"delivered {num_chunks} chunks to {len(spec.destinations)} destination(s)"
        )
    return Decision(st, actions, events)


def _prestart(
    obs: Observed,
    config: OperatorConfig,
    spec: BackfillSpec,
    staging: JobObs,
    by_phase: dict[str, JobObs],
    decision: Decision,
    create: Any,
) -> Decision:
    """The transport Job of a staging that runs long enough (config.transport_prestart_seconds):
    its Pods start while staging runs and wait for the manifest, so none starts between the
    phases. Not before the staging Pod runs: in a full cluster, Pods waiting for a manifest must
    not hold the room the staging Pod needs. Not for a short staging: the chunk count is not
    known yet, so there are `parallelism` workers, more than a small backfill has chunks."""
    after = config.transport_prestart_seconds
    if after is None or not staging.ready or staging.suspended or child_jobs.TRANSPORT in by_phase:
        return decision
    age = (obs.now - parse_timestamp(staging.created_at)).total_seconds() if staging.created_at else after
    if age < after:
        decision.requeue_after = after - age
        return decision
    decision.actions.append(
        create(
            child_jobs.transport_job(
                obs.name, obs.namespace, obs.uid, spec, config, None, obs.queue_name, decision.status.attempt or 1
            )
        )
    )
    return decision


def wants_retry(spec: dict[str, Any], status: BackfillStatus) -> bool:
    """A failed backfill whose spec.retry asks for an attempt beyond the last one made."""
    retry = spec.get("retry") or 0
    return status.status == Phase.FAILED and isinstance(retry, int) and retry >= (status.attempt or 1)


def _retry(obs: Observed, st: BackfillStatus, events: list[Event], now: str) -> bool:
    """Start attempt spec.retry+1 of a failed backfill, in place: True if one starts now.

    Staged files that are still there are reused, and the new transport Job's workers skip the
    chunks whose delivery markers the earlier attempts wrote, so only what did not complete is
    sent again; without staged files (failed in staging, or deleted) it stages again.
    """
    if not wants_retry(obs.spec, st):
        return False
    previous = st.attempt or 1
    st.attempt = obs.spec["retry"] + 1
    reuse = st.num_chunks is not None and obs.staged is not False
    if reuse:
        last = next((j for j in obs.jobs if j.phase == child_jobs.TRANSPORT and j.attempt == previous), None)
        done = chunks_delivered(last, st.num_chunks, obs.progress)
        what = f"delivering the chunks not delivered yet ({st.num_chunks - done} of {st.num_chunks} did not complete in attempt {previous}); staged files reused"
        st.status, st.chunks_left = Phase.TRANSPORTING, st.num_chunks - done
    else:
        why = "no staged files to reuse" if st.num_chunks is None else "the staged files are gone"
        what = f"staging again ({why})"
        st.status, st.num_chunks, st.chunks_left, st.num_rows = Phase.STAGING, None, None, None
        # The new staging's times are its own; nothing of the new chunks is delivered yet.
        st.rows_delivered, st.time_staging_started, st.time_transporting_started = None, None, None
        _set_condition(st, "Staged", False, "Staging", "exporting the window from Snowflake", now, obs.generation)
    st.error_message = None
    st.time_completed = None
    st.staged_files_deleted = None
    msg = f"attempt {st.attempt} (spec.retry {obs.spec['retry']}): {what}"
    _set_condition(st, "Failed", False, "Retrying", "", now, obs.generation)
    events.append(Event("Normal", "Retrying", msg))
    return True


def _beyond_bounds(spec: BackfillSpec, config: OperatorConfig) -> str:
    """Why spec.resources or spec.backoff_limit_per_index exceed what this operator allows, or ""."""
    from kubernetes.utils.quantity import parse_quantity

    limit = config.max_backoff_limit_per_index
    if spec.backoff_limit_per_index is not None and spec.backoff_limit_per_index > limit:
        return (
            f"spec.backoff_limit_per_index {spec.backoff_limit_per_index} is more than this operator allows "
            f"({limit}, config.max_backoff_limit_per_index)"
        )
    if spec.resources is None:
        return ""
    asked = child_jobs.worker_resources(spec, config)
    for kind in ("requests", "limits"):
        for key, value in (asked.get(kind) or {}).items():
            most = config.max_worker_resources.get(key)
            if most is not None and parse_quantity(value) > parse_quantity(most):
                return (
                    f"spec.resources.{kind}.{key} {value} is more than this operator allows ({most}, "
                    "config.max_worker_resources); ask for less or ask your administrator"
                )
    for key, value in (asked.get("requests") or {}).items():
        cap = (asked.get("limits") or {}).get(key)
        if cap is not None and parse_quantity(value) > parse_quantity(cap):
            return f"spec.resources.requests.{key} {value} is more than its limit {cap}"
    return ""


def _suspension(
    obs: Observed,
    st: BackfillStatus,
    spec: BackfillSpec,
    by_phase: dict[str, JobObs],
    actions: list[Action],
    events: list[Event],
    now: str,
) -> Decision | None:
    """spec.suspend: a Decision while the backfill stays paused, None to go on as usual.

    The Job of the current phase is suspended (while staging, the transport Job that started
    with it too): Kubernetes ends their Pods (without counting them as failures) and keeps their
    completed indexes, and the progress objects stay, so resuming delivers only what is left. A
    Job that finished meanwhile is not held back: its end is handled as usual.
    """
    current = by_phase.get(child_jobs.TRANSPORT if st.status == Phase.TRANSPORTING else child_jobs.STAGING)
    jobs = [j for j in (current, by_phase.get(child_jobs.TRANSPORT)) if j is not None]
    jobs = list({j.name: j for j in jobs}.values())
    was = any(c.type == "Suspended" and c.status == "True" for c in st.conditions)
    if not spec.suspend:
        actions.extend(SuspendJob(j.name, False) for j in jobs if j.suspended and not j.queued and not j.deleting)
        if was:
            msg = "resumed (spec.suspend false): delivering the chunks not yet delivered"
            _set_condition(st, "Suspended", False, "Resumed", msg, now, obs.generation)
            events.append(Event("Normal", "Resumed", msg))
        return None
    if current is not None and not running(current):
        return None
    actions.extend(SuspendJob(j.name, True) for j in jobs if running(j) and not j.suspended and not j.deleting)
    if current is not None and st.status == Phase.TRANSPORTING:
        num = st.num_chunks or 0
        st.chunks_left = max(num - chunks_delivered(current, num, obs.progress), 0)
    if not was:
        where = f"{st.chunks_left} of {st.num_chunks} chunks left" if st.status == Phase.TRANSPORTING else "staging"
        msg = f"suspended by request (spec.suspend) while {where}: its Pods end; set suspend to false to resume"
        _set_condition(st, "Suspended", True, "Suspended", msg, now, obs.generation)
        events.append(Event("Normal", "Suspended", msg))
    return Decision(st, actions, events)


def _terminal(
    obs: Observed, st: BackfillStatus, config: OperatorConfig, actions: list[Action], events: list[Event]
) -> Decision:
    # Jobs left after a terminal status (the operator died between status and delete): a
    # cancelled backfill keeps none, a failed or completed one keeps finished Jobs until their TTL.
    actions.extend(
        DeleteJob(j.name) for j in obs.jobs if not j.deleting and (st.status == Phase.CANCELLED or running(j))
    )
    done_at = parse_timestamp(st.time_completed) if st.time_completed else obs.now
    wake: list[float] = []
    if st.status == Phase.COMPLETED and st.num_chunks and not st.staged_files_deleted:
        due = done_at + timedelta(seconds=config.staged_retention_seconds)
        if obs.now >= due:
            actions.append(DeleteStaged(child_jobs.staging_uri(config, obs.namespace, obs.uid)))
            st.staged_files_deleted = True
        else:
            wake.append((due - obs.now).total_seconds())
    ttl = (obs.spec or {}).get("ttl_seconds_after_finished")
    ttl = config.backfill_ttl_seconds if ttl is None else ttl
    if ttl is not None:
        due = done_at + timedelta(seconds=ttl)
        if obs.now >= due:
            actions.append(DeleteBackfill())
            events.append(
                Event(
                    "Normal", "Expired", f"{st.status} {ttl}s ago (ttl_seconds_after_finished): deleting the backfill"
                )
            )
        else:
            wake.append((due - obs.now).total_seconds())
    return Decision(st, actions, events, requeue_after=min(wake) if wake else None)


def _iso_or(timestamp: str, default: str) -> str:
    """A Kubernetes timestamp in utc_iso's form, or default if there is none or it does not parse."""
    try:
        return utc_iso(parse_timestamp(timestamp)) if timestamp else default
    except ValueError:
        return default


def running(job: JobObs) -> bool:
    return bool(job.active) or not (job.complete or job.failed)


def _within_grace(job: JobObs, now: datetime) -> bool:
    if not job.finished_at:
        return False
    return (now - parse_timestamp(job.finished_at)).total_seconds() < POD_MESSAGE_GRACE_S


def _staging_result(pods: tuple[PodObs, ...], job: str) -> StagingResult | None:
    for p in sorted((p for p in pods if p.job == job and p.succeeded), key=lambda p: p.finished_at, reverse=True):
        try:
            return StagingResult.model_validate_json(p.message)
        except ValueError:  # pydantic's ValidationError is one
            continue
    return None


def finalize_actions(
    namespace: str, uid: str, jobs: Iterable[JobObs], pods_left: int, config: OperatorConfig
) -> list[Action]:
    """What deleting a BeamBackfill must clean up before its finalizer is removed, from live
    reads of its Jobs and Pods: Jobs are deleted first, and the staged prefix only once no Job
    and no Pod is left, since a worker still running (or one a restarted operator has not seen
    yet) could write there after the deletion. No DeleteStaged: not finished, ask again."""
    jobs = list(jobs)
    if jobs or pods_left:
        return [DeleteJob(j.name) for j in jobs if not j.deleting]
    return [DeleteStaged(child_jobs.staging_uri(config, namespace, uid))]


def _destination_hosts(dest) -> list[str]:
    """The hosts a destination's addresses name, as written."""
    if dest.type == "kafka":
        addresses = (dest.bootstrap_servers or "").split(",")
    else:
        addresses = [dest.endpoint_url or ""] if dest.type == "sns" else dest.url.split(",")
    return [found[0] for a in addresses if a.strip() and (found := endpoint(a))]


def _inward_literal(spec: BackfillSpec, config: OperatorConfig) -> str | None:
    """A destination whose address is an inward IP literal (loopback, link-local, private, the
    cluster's ranges), refused before any Job as the worker would refuse it after staging. Names
    are left to the worker, which checks what they resolve to when it connects."""
    for dest in spec.destinations:
        for host in _destination_hosts(dest):
            if why := literal_refusal(host, config.destination_allow, config.cluster_cidrs):
                return (
                    f"{dest.type} destination '{dest.name}': {host} is {why}; destinations may not reach loopback, "
                    "link-local, private, multicast or cluster addresses unless an administrator allows the host or "
                    "CIDR (config.destination_allow, docs/security.md)"
                )
    return None


def _namespace_full(obs: Observed, config: OperatorConfig) -> str | None:
    """Why a backfill that has not started may not, its namespace holding as many live backfills
    or spec bytes as the operator allows one organization (issue 25); None if it may."""
    if obs.namespace_load is None:
        return None
    live, spec_bytes, own = obs.namespace_load
    if config.max_live_backfills_per_namespace is not None and live >= config.max_live_backfills_per_namespace:
        return (
            f"namespace {obs.namespace} already holds {live} live backfills, the most this operator allows one "
            f"organization (config.max_live_backfills_per_namespace: {config.max_live_backfills_per_namespace}); "
            "create it again once some have ended, or delete ones you no longer need"
        )
    most = config.max_spec_bytes_per_namespace
    if most is not None and spec_bytes + own > most:
        return (
            f"namespace {obs.namespace}'s live backfills hold {spec_bytes} bytes of spec, and this one's {own} more "
            f"would pass the {most} this operator allows one organization (config.max_spec_bytes_per_namespace); "
            "create it again once some have ended, or split its filter differently"
        )
    return None
