"""The public API's job object, read straight off a BeamBackfill resource.

Nothing here is stored anywhere else: every answer is computed from the resource as the
apiserver returns it, so the API and kubectl cannot disagree.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from beam_contract.model import Phase, destination_uid, workflow_id

# The annotation the API puts on what it creates: creationTimestamp has one-second precision,
# and a script creating several backfills in a loop expects them listed in the order it made them.
CREATED_AT_ANNOTATION = "beam-backfill.dev/created-at"

JOB_FIELDS = (
    "job_id",
    "workflow_id",
    "organization_id",
    "status",
    "job_name",
    "table",
    "partition_key",
    "backfill_start",
    "backfill_end",
    "filter_column",
    "filter_values",
    "destinations",
    "static_egress_ip",
    "num_chunks",
    "chunks_left",
    "error_message",
    "time_created",
    "time_completed",
)


class JobDestination(BaseModel):
    """A destination as created, plus the uid the server gives it."""

    model_config = ConfigDict(extra="allow")
    type: str
    name: str
    uid: str


class Job(BaseModel):
    """One backfill, in the public API's list shape."""

    job_id: str = Field(description="The BeamBackfill's metadata.uid.")
    workflow_id: str = Field(description="beam-backfill-<organization_id>-<job_id>.")
    organization_id: str = Field(description="The caller's organization (the resource's namespace).")
    status: Phase = Field(
        description="staging (also before the operator's first reconcile), transporting, completed, failed or cancelled."
    )
    job_name: str
    table: str
    partition_key: Literal["block", "block_timestamp"]
    backfill_start: str | int = Field(description="Inclusive window start, as given at creation.")
    backfill_end: str | int = Field(description="Exclusive window end, as given at creation.")
    filter_column: str | None
    filter_values: list[str | int] | None
    destinations: list[JobDestination]
    static_egress_ip: bool
    num_chunks: int | None = Field(description="Parquet files staged; null while staging.")
    chunks_left: int | None = Field(description="Chunks still to deliver; null while staging.")
    error_message: str | None
    time_created: str = Field(description="ISO 8601 UTC with Z.")
    time_completed: str | None = Field(description="ISO 8601 UTC with Z; null until the job ends.")


class CreateResponse(BaseModel):
    job_id: str
    workflow_id: str


class CancelResponse(BaseModel):
    job_id: str
    workflow_id: str
    status: Phase = Field(
        description="The job's status when the cancel was recorded; it becomes cancelled once the operator has stopped it."
    )
    cancel_requested: Literal[True] = True


class ErrorBody(BaseModel):
    detail: Any = Field(description="A message, or for 422 a list of {loc, msg, type, field} naming each bad field.")


def public_status(obj: dict[str, Any]) -> Phase:
    # The resource exists before the operator has seen it; to a user it is already being staged.
    return Phase((obj.get("status") or {}).get("status") or Phase.STAGING)


def job_view(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    spec = obj.get("spec") or {}
    st = obj.get("status") or {}
    uid = meta["uid"]
    org = meta["namespace"]
    window = spec.get("backfill_window") or {}
    flt = spec.get("filter") or None
    destinations = []
    for i, d in enumerate(spec.get("destinations") or []):
        # destination_uid needs only type and name; a SimpleNamespace keeps this working for a
        # resource written by a newer model with fields this one does not know.
        uid_d = destination_uid(uid, i, SimpleNamespace(type=d.get("type", ""), name=d.get("name", "")))
        destinations.append({**d, "uid": uid_d})
    return {
        "job_id": uid,
        "workflow_id": st.get("workflow_id") or workflow_id(org, uid),
        "organization_id": org,
        "status": public_status(obj),
        "job_name": spec.get("job_name", ""),
        "table": spec.get("table", ""),
        "partition_key": window.get("partition_key"),
        "backfill_start": window.get("start"),
        "backfill_end": window.get("end"),
        "filter_column": flt.get("column") if flt else None,
        "filter_values": flt.get("values") if flt else None,
        "destinations": destinations,
        "static_egress_ip": bool(spec.get("static_egress_ip", False)),
        "num_chunks": st.get("num_chunks"),
        "chunks_left": st.get("chunks_left"),
        "error_message": st.get("error_message"),
        # metadata.creationTimestamp is already ISO 8601 UTC with Z, and equals what the
        # operator copies into status.time_created.
        "time_created": st.get("time_created") or meta["creationTimestamp"],
        "time_completed": st.get("time_completed"),
    }


def creation_order(obj: dict[str, Any]) -> tuple[str, str, str]:
    meta = obj["metadata"]
    return (
        meta.get("creationTimestamp", ""),
        (meta.get("annotations") or {}).get(CREATED_AT_ANNOTATION, ""),
        meta.get("name", ""),
    )


def field_path(loc: Any) -> str:
    """The field a 422 item names, as a user wrote it: FastAPI's loc includes "body" and the
    discriminator's tag (e.g. block_timestamp), and pydantic's the tag; the rest is the field."""
    parts = [str(p) for p in loc if p not in ("body", "block", "block_timestamp", "kafka", "webhook", "nats", "sns")]
    return ".".join(parts)
