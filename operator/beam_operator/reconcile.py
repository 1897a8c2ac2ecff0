"""The reconcile logic as a pure function: what was observed in, the next status and actions out.

Nothing here talks to Kubernetes. The controller feeds it what it observed of a BeamBackfill
and the Jobs and Pods it owns (observe.Observed), then carries out the actions and writes the
status. Because the input is only what can be observed, an operator that restarts mid-status
computes the same decision again, and deterministic Job names turn a repeated create into
AlreadyExists.

One round reads top to bottom in _decide(): a retry asked for, the first sight of a backfill
(_pending), the checks that can end it before any Job (validate), its time limits (_overdue),
spec.suspend, then one step for the status it is in (_staging, _transporting; _terminal once
it has ended). Each step takes the Decision being built and returns it; _end() is the one way
a backfill ends.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic import ValidationError

from beam_contract.addresses import endpoint, literal_refusal
from beam_contract.model import BackfillSpec, BackfillStatus, Condition, Phase, parse_timestamp, utc_iso, workflow_id
from beam_contract.worker import SPEC_CONFIGMAP_MAX_BYTES, StagingResult, parse_failure, worker_chunks

from . import child_jobs
from .config import OperatorConfig
from .observe import (
    STUCK_HINTS,
    STUCK_RECHECK_S,
    JobObs,
    Observed,
    PodObs,
    current_jobs,
    running,
    workers_share_chunks,
)
from .observe import WaitingPod as WaitingPod  # re-exported: reconcile()'s callers name it from here
from .observe import stuck_recheck_after as stuck_recheck_after  # re-exported, as WaitingPod
from .quantity import parse_quantity
from .runtime.events import MAX_EVENT_MESSAGE, Event

KAFKA_TOPIC_MAX_LENGTH = 249

MAX_ERROR = 1024
# Job and Pod watches are separate streams: a Job can be seen finished before its Pod's
# termination message arrives. Wait this long for the message before deciding without it.
POD_MESSAGE_GRACE_S = 15.0


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


@dataclass(frozen=True)
class Ending:
    """How a backfill ends: its last status, and the reason and message of its Event and
    conditions."""

    phase: Phase
    reason: str
    message: str
    warning: bool = True


@dataclass(frozen=True)
class _Round:
    """What the steps after validate() read: the observation, the configuration, the valid
    spec, and the current attempt's Jobs by kind (earlier attempts' finished Jobs stay until
    their TTL)."""

    obs: Observed
    config: OperatorConfig
    spec: BackfillSpec
    attempt: int
    jobs: dict[str, JobObs]


def reconcile(obs: Observed, config: OperatorConfig) -> Decision:
    """The next status of one backfill, the actions and Events that get it there, and when to
    look again without a watch event."""
    d = _decide(obs, config)
    if d.status.status in (Phase.STAGING, Phase.TRANSPORTING) and (wake := _next_look(obs, d.status, config)):
        d.requeue_after = wake if d.requeue_after is None else min(d.requeue_after, wake)
    return d


def _decide(obs: Observed, config: OperatorConfig) -> Decision:
    """One round, each step in turn; the first that decides how the round ends returns."""
    d = Decision(obs.status.model_copy(deep=True))
    retrying = _retry(obs, d)
    attempt = d.status.attempt or 1
    if d.status.status is None:
        _pending(obs, d)
    d.status.observedGeneration = obs.generation
    if d.status.status.terminal:
        return _terminal(obs, config, d)
    if d.status.status == Phase.TRANSPORTING:
        _count_rows(d.status, obs.progress)
    spec = validate(obs, config, retrying=retrying)
    if isinstance(spec, Ending):
        return _end(obs, config, d, spec)
    r = _Round(obs, config, spec, attempt, {j.kind: j for j in obs.jobs if j.attempt == attempt})
    if (ending := _overdue(r, d.status)) is not None:
        return _end(obs, config, d, ending)
    if _suspension(r, d):
        return d
    if d.status.status == Phase.STAGING:
        return _staging(r, d)
    return _transporting(r, d)


# --- the steps, in the order _decide() takes them -----------------------------------------


def wants_retry(spec: dict[str, Any], status: BackfillStatus) -> bool:
    """A failed backfill whose spec.retry asks for an attempt beyond the last one made."""
    retry = spec.get("retry") or 0
    return status.status == Phase.FAILED and isinstance(retry, int) and retry >= (status.attempt or 1)


def _retry(obs: Observed, d: Decision) -> bool:
    """Start attempt spec.retry+1 of a failed backfill, in place: True if one starts now.

    Staged files that are still there are reused, and the new transport Job's workers skip the
    chunks whose delivery markers the earlier attempts wrote, so only what did not complete is
    sent again; without staged files (failed in staging, or deleted) it stages again.
    """
    st, now = d.status, utc_iso(obs.now)
    if not wants_retry(obs.spec, st):
        return False
    previous = st.attempt or 1
    st.attempt = obs.spec["retry"] + 1
    reuse = st.num_chunks is not None and obs.staged is not False
    if reuse:
        last = next((j for j in obs.jobs if j.kind == child_jobs.TRANSPORT and j.attempt == previous), None)
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
    d.events.append(Event("Normal", "Retrying", msg))
    return True


def _pending(obs: Observed, d: Decision) -> None:
    """First sight: the identity fields the public API reports, and staging begins."""
    now = utc_iso(obs.now)
    d.status = BackfillStatus(
        status=Phase.STAGING,
        job_id=obs.uid,
        workflow_id=workflow_id(obs.namespace, obs.uid),
        time_created=obs.creation_timestamp or now,
        conditions=d.status.conditions,
    )
    _set_condition(d.status, "Staged", False, "Staging", "exporting the window from Snowflake", now, obs.generation)
    d.events.append(Event("Normal", _reason(Phase.STAGING), "exporting the window from Snowflake to staging"))


def validate(obs: Observed, config: OperatorConfig, *, retrying: bool = False) -> BackfillSpec | Ending:
    """The spec, or why the backfill ends before any Job: checks the CRD cannot do, since they
    depend on the operator's configuration, the namespace and the apiserver's answers."""
    try:
        spec = BackfillSpec.model_validate(obs.spec)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        return Ending(Phase.FAILED, "InvalidSpec", f"invalid spec: {loc}: {first['msg']}")
    if spec.cancel:
        return Ending(Phase.CANCELLED, "Cancelled", "cancelled by request (spec.cancel)", warning=False)
    for dest in spec.destinations:
        for field_name in ("secret", "hash_key"):
            secret = getattr(dest, field_name, None)
            if secret and not config.destination_secret_allowed(secret):
                return Ending(
                    Phase.FAILED,
                    "SecretNotAllowed",
                    f"{dest.type} destination '{dest.name}': {field_name} {secret!r} is not a destination Secret; "
                    f"destinations may only name Secrets whose name starts with {config.destination_secret_prefix!r}, "
                    "which an administrator provisions for them (docs/security.md)",
                )
    for dest in spec.destinations:
        if dest.type == "sns" and not dest.secret and obs.namespace not in config.ambient_identity_namespaces:
            return Ending(
                Phase.FAILED,
                "AmbientIdentityOff",
                f"sns destination '{dest.name}' has no secret, and the workers' own cloud identity is not enabled "
                f"for organization {obs.namespace}; name a destination Secret with aws_access_key_id and "
                "aws_secret_access_key, or ask your administrator to add the organization to "
                "config.ambient_identity_namespaces",
            )
    if why := _beyond_bounds(spec, config):
        return Ending(Phase.FAILED, "ResourcesNotAllowed", why)
    if why := _inward_literal(spec, config):
        return Ending(Phase.FAILED, "DestinationNotAllowed", why)
    for dest in spec.destinations:
        if dest.type == "kafka" and len(topic := dest.topic_in(obs.namespace)) > KAFKA_TOPIC_MAX_LENGTH:
            room = KAFKA_TOPIC_MAX_LENGTH - len(obs.namespace) - 1
            return Ending(
                Phase.FAILED,
                "TopicTooLong",
                f"kafka destination '{dest.name}': on the managed Kafka its topic is {topic[:40]}... "
                f"(<namespace>.<name>), {len(topic)} characters, more than Kafka's {KAFKA_TOPIC_MAX_LENGTH}; "
                f"in this namespace a name may have at most {room}",
            )
    # A retry's Job creates are asked again: the last attempt's refusals are not its own.
    for kind, why in ({} if retrying else obs.refused).items():
        return Ending(Phase.FAILED, "JobRefused", f"the cluster refused the {kind} Job: {why}")
    if why := _namespace_full(obs, config):
        return Ending(Phase.FAILED, "NamespaceFull", why)
    if not config.table_allowed(spec.table):
        allowed = ", ".join(config.allowed_tables)
        return Ending(
            Phase.FAILED,
            "TableNotAllowed",
            f"table {spec.table} is not allowed by this operator; allowed tables: {allowed}",
        )
    if spec.static_egress_ip and not config.egress.configured:
        return Ending(
            Phase.FAILED,
            "NoStaticEgress",
            "static_egress_ip is true but this operator has no static egress configured (egress.podLabels, nodeSelector or tolerations in the chart's values); "
            "set static_egress_ip: false or ask your administrator to configure egress",
        )
    return spec


def _overdue(r: _Round, st: BackfillStatus) -> Ending | None:
    """Why a running backfill ends now: past its deadline, or a Pod stuck for too long."""
    obs, config = r.obs, r.config
    deadline = _deadline(obs, st, config)
    if deadline is not None and obs.now >= deadline:
        seconds = (obs.spec or {}).get("active_deadline_seconds") or config.default_active_deadline_seconds
        if st.status == Phase.TRANSPORTING:
            num = st.num_chunks or 0
            st.chunks_left = num - chunks_delivered(r.jobs.get(child_jobs.TRANSPORT), num, obs.progress)
        where = f"{st.chunks_left} of {st.num_chunks} chunks left" if st.status == Phase.TRANSPORTING else "staging"
        return Ending(
            Phase.FAILED,
            "DeadlineExceeded",
            f"the backfill ran past its active_deadline_seconds ({seconds}s) with {where}; raise "
            "spec.active_deadline_seconds and retry (spec.retry) to go on from where it stopped",
        )
    if stuck := stuck_pods(obs, config):
        return Ending(Phase.FAILED, "PodStuck", stuck)
    return None


def _suspension(r: _Round, d: Decision) -> bool:
    """spec.suspend: True while the backfill stays paused (d says so), False to go on as usual.

    The Job of the current status is suspended (while staging, the transport Job that started
    with it too): Kubernetes ends their Pods (without counting them as failures) and keeps their
    completed indexes, and the progress objects stay, so resuming delivers only what is left. A
    Job that finished meanwhile is not held back: its end is handled as usual.
    """
    obs, st, now = r.obs, d.status, utc_iso(r.obs.now)
    current = r.jobs.get(child_jobs.TRANSPORT if st.status == Phase.TRANSPORTING else child_jobs.STAGING)
    jobs = [j for j in (current, r.jobs.get(child_jobs.TRANSPORT)) if j is not None]
    jobs = list({j.name: j for j in jobs}.values())
    was = any(c.type == "Suspended" and c.status == "True" for c in st.conditions)
    if not r.spec.suspend:
        d.actions.extend(SuspendJob(j.name, False) for j in jobs if j.suspended and not j.queued and not j.deleting)
        if was:
            msg = "resumed (spec.suspend false): delivering the chunks not yet delivered"
            _set_condition(st, "Suspended", False, "Resumed", msg, now, obs.generation)
            d.events.append(Event("Normal", "Resumed", msg))
        return False
    if current is not None and not running(current):
        return False
    d.actions.extend(SuspendJob(j.name, True) for j in jobs if running(j) and not j.suspended and not j.deleting)
    if current is not None and st.status == Phase.TRANSPORTING:
        num = st.num_chunks or 0
        st.chunks_left = max(num - chunks_delivered(current, num, obs.progress), 0)
    if not was:
        where = f"{st.chunks_left} of {st.num_chunks} chunks left" if st.status == Phase.TRANSPORTING else "staging"
        msg = f"suspended by request (spec.suspend) while {where}: its Pods end; set suspend to false to resume"
        _set_condition(st, "Suspended", True, "Suspended", msg, now, obs.generation)
        d.events.append(Event("Normal", "Suspended", msg))
    return True


def _staging(r: _Round, d: Decision) -> Decision:
    """Staging: its Job asked for, then its end read from the staging Pod's result."""
    obs, config, spec, st, now = r.obs, r.config, r.spec, d.status, utc_iso(r.obs.now)
    job = r.jobs.get(child_jobs.STAGING)
    if job is None:
        if not child_jobs.spec_travels_inline(spec):
            size = len(child_jobs.compressed_spec(spec))
            if size > SPEC_CONFIGMAP_MAX_BYTES:
                return _end(
                    obs,
                    config,
                    d,
                    Ending(
                        Phase.FAILED,
                        "SpecTooLarge",
                        f"the spec is {size} bytes even gzip'd, more than the {SPEC_CONFIGMAP_MAX_BYTES} a ConfigMap "
                        "can carry to the workers; split filter.values over several backfills",
                    ),
                )
        d.actions.append(
            _create(
                r, child_jobs.staging_job(obs.name, obs.namespace, obs.uid, spec, config, obs.queue_name, r.attempt)
            )
        )
        st.time_staging_started = st.time_staging_started or now
        return d
    # The Job's own creation, if this status was not written with its create (an operator
    # that died between the two, or one from before this field).
    st.time_staging_started = st.time_staging_started or _iso_or(job.created_at, now)
    if job.failed:
        why, _ = _worker_message(obs.pods, job.name)
        if not why and _within_grace(job, obs.now):
            d.requeue_after = 1.0
            return d
        why = why or job.failure_message or job.failure_reason
        d.events.extend(_worker_log(obs.pods, job.name, None, "staging"))
        return _end(obs, config, d, Ending(Phase.FAILED, "StagingFailed", f"staging failed: {why}"))
    if not job.complete:
        return _prestart(r, job, d)
    result = _staging_result(obs.pods, job.name)
    if result is None and _within_grace(job, obs.now):
        d.requeue_after = 1.0
        return d
    if result is None:
        return _end(
            obs,
            config,
            d,
            Ending(
                Phase.FAILED,
                "StagingFailed",
                "staging finished but reported no chunk count (no termination message from the staging Pod)",
            ),
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
        return _end(
            obs, config, d, Ending(Phase.COMPLETED, "Completed", "the window holds no rows: nothing to deliver", False)
        )
    st.status = Phase.TRANSPORTING
    st.time_transporting_started, st.rows_delivered = now, 0
    d.events.append(
        Event(
            "Normal",
            _reason(Phase.TRANSPORTING),
            f"staged {result.num_chunks} chunks ({result.num_rows} rows); delivering to {len(spec.destinations)} destination(s)",
        )
    )
    if child_jobs.TRANSPORT not in r.jobs:
        d.actions.append(
            _create(
                r,
                child_jobs.transport_job(
                    obs.name, obs.namespace, obs.uid, spec, config, result.num_chunks, obs.queue_name, r.attempt
                ),
            )
        )
    return d


def _prestart(r: _Round, staging: JobObs, d: Decision) -> Decision:
    """The transport Job of a staging that runs long enough (config.transport_prestart_seconds):
    its Pods start while staging runs and wait for the manifest, so none starts between the
    two. Not before the staging Pod runs: in a full cluster, Pods waiting for a manifest must
    not hold the room the staging Pod needs. Not for a short staging: the chunk count is not
    known yet, so there are `parallelism` workers, more than a small backfill has chunks."""
    obs, config = r.obs, r.config
    after = config.transport_prestart_seconds
    if after is None or not staging.ready or staging.suspended or child_jobs.TRANSPORT in r.jobs:
        return d
    age = (obs.now - parse_timestamp(staging.created_at)).total_seconds() if staging.created_at else after
    if age < after:
        d.requeue_after = after - age
        return d
    d.actions.append(
        _create(
            r,
            child_jobs.transport_job(
                obs.name, obs.namespace, obs.uid, r.spec, config, None, obs.queue_name, d.status.attempt or 1
            ),
        )
    )
    return d


def _transporting(r: _Round, d: Decision) -> Decision:
    """Transporting: its Job asked for, chunks_left counted down, its end read from the Job."""
    obs, config, spec, st = r.obs, r.config, r.spec, d.status
    num_chunks = st.num_chunks or 0
    job = r.jobs.get(child_jobs.TRANSPORT)
    if job is None:
        d.actions.append(
            _create(
                r,
                child_jobs.transport_job(
                    obs.name, obs.namespace, obs.uid, spec, config, num_chunks, obs.queue_name, r.attempt
                ),
            )
        )
        return d
    st.chunks_left = max(num_chunks - chunks_delivered(job, num_chunks, obs.progress), 0)
    if job.failed:
        idx = first_index(job.failed_indexes)
        why, chunk = _worker_message(obs.pods, job.name, idx)
        if not why and _within_grace(job, obs.now):
            d.requeue_after = 1.0
            return d
        why = why or job.failure_message or job.failure_reason
        if chunk is None and idx is not None and job.completions == num_chunks:
            chunk = idx  # one chunk per worker: the index is the chunk
        where = f"chunk {chunk}" if chunk is not None else "a chunk"
        d.events.extend(_worker_log(obs.pods, job.name, idx, f"transport {where}"))
        return _end(
            obs,
            config,
            d,
            Ending(Phase.FAILED, "TransportFailed", f"transport failed on {where} of {num_chunks}: {why}"),
        )
    if job.complete:
        st.chunks_left = 0
        return _end(
            obs,
            config,
            d,
            Ending(
                Phase.COMPLETED,
                "Completed",
                f"delivered {num_chunks} chunks to {len(spec.destinations)} destination(s)",
                False,
            ),
        )
    return d


def _end(obs: Observed, config: OperatorConfig, d: Decision, ending: Ending) -> Decision:
    """The backfill ends: its last status, conditions and Event. One that did not complete
    leaves no Job running (a cancelled one no Job at all); one that completed has its staged
    files deleted after config.staged_retention_seconds."""
    st, phase, now = d.status, ending.phase, utc_iso(obs.now)
    st.status = phase
    st.time_completed = st.time_completed or now
    if phase == Phase.FAILED:
        st.error_message = _clip(ending.message)
    failed, completed = phase == Phase.FAILED, phase == Phase.COMPLETED
    if completed and st.num_rows is not None:
        st.rows_delivered = st.num_rows  # every chunk reached every destination
    _set_condition(st, "Failed", failed, ending.reason, ending.message if failed else "", now, obs.generation)
    _set_condition(st, "Complete", completed, ending.reason, ending.message if completed else "", now, obs.generation)
    if phase == Phase.CANCELLED:
        _set_condition(st, "Cancelled", True, ending.reason, ending.message, now, obs.generation)
    if not completed:
        d.actions.extend(
            DeleteJob(j.name) for j in obs.jobs if not j.deleting and (phase == Phase.CANCELLED or running(j))
        )
    d.events.append(Event("Warning" if ending.warning else "Normal", _reason(phase), ending.message))
    if completed and config.staged_retention_seconds == 0 and st.num_chunks is not None:
        d.actions.append(DeleteStaged(child_jobs.staging_uri(config, obs.namespace, obs.uid)))
        st.staged_files_deleted = True
    elif completed and st.num_chunks is not None:
        d.requeue_after = float(config.staged_retention_seconds)
    return d


def _terminal(obs: Observed, config: OperatorConfig, d: Decision) -> Decision:
    """An ended backfill: what is left of it goes, its staged files after their retention and
    the backfill itself after its ttl_seconds_after_finished."""
    st = d.status
    # Jobs left after a terminal status (the operator died between status and delete): a
    # cancelled backfill keeps none, a failed or completed one keeps finished Jobs until their TTL.
    d.actions.extend(
        DeleteJob(j.name) for j in obs.jobs if not j.deleting and (st.status == Phase.CANCELLED or running(j))
    )
    done_at = parse_timestamp(st.time_completed) if st.time_completed else obs.now
    wake: list[float] = []
    if st.status == Phase.COMPLETED and st.num_chunks and not st.staged_files_deleted:
        due = done_at + timedelta(seconds=config.staged_retention_seconds)
        if obs.now >= due:
            d.actions.append(DeleteStaged(child_jobs.staging_uri(config, obs.namespace, obs.uid)))
            st.staged_files_deleted = True
        else:
            wake.append((due - obs.now).total_seconds())
    ttl = (obs.spec or {}).get("ttl_seconds_after_finished")
    ttl = config.backfill_ttl_seconds if ttl is None else ttl
    if ttl is not None:
        due = done_at + timedelta(seconds=ttl)
        if obs.now >= due:
            d.actions.append(DeleteBackfill())
            d.events.append(
                Event(
                    "Normal", "Expired", f"{st.status} {ttl}s ago (ttl_seconds_after_finished): deleting the backfill"
                )
            )
        else:
            wake.append((due - obs.now).total_seconds())
    d.requeue_after = min(wake) if wake else None
    return d


# --- what the steps share ---------------------------------------------------------------


def _create(r: _Round, manifest: dict[str, Any]) -> CreateJob:
    """A Job create, with what must exist before it: the staged-data key Secret, and the spec's
    ConfigMap when the spec does not travel in the environment."""
    obs = r.obs
    key = child_jobs.staging_key_secret(obs.name, obs.namespace, obs.uid)
    if child_jobs.spec_travels_inline(r.spec):
        return CreateJob(manifest, key_secret=key)
    return CreateJob(manifest, child_jobs.spec_config_map(obs.name, obs.namespace, obs.uid, r.spec), key)


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


def _next_look(obs: Observed, st: BackfillStatus, config: OperatorConfig) -> float | None:
    """When to look again without a watch event: at the deadline, and while Pods do not run."""
    wake = []
    if (deadline := _deadline(obs, st, config)) is not None:
        wake.append(max((deadline - obs.now).total_seconds(), 0.0))
    jobs = current_jobs(obs, st)
    if any(running(j) and not j.suspended and j.ready < max(j.active, 1) for j in jobs):
        wake.append(STUCK_RECHECK_S)
    if st.status == Phase.TRANSPORTING and (
        transport := next((j for j in jobs if j.kind == child_jobs.TRANSPORT), None)
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


def _beyond_bounds(spec: BackfillSpec, config: OperatorConfig) -> str:
    """Why spec.resources or spec.backoff_limit_per_index exceed what this operator allows, or ""."""
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


def _iso_or(timestamp: str, default: str) -> str:
    """A Kubernetes timestamp in utc_iso's form, or default if there is none or it does not parse."""
    try:
        return utc_iso(parse_timestamp(timestamp)) if timestamp else default
    except ValueError:
        return default


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
