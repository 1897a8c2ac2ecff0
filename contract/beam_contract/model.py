"""The BeamBackfill spec and status: the single source of truth.

The CRD's OpenAPI schema (crds/), the REST API's request body and the jobrunner's input are all
this model. Field names inside spec and status are the public Beam API's snake_case on purpose,
so that a REST create body and a BeamBackfill's spec are the same document; Kubernetes' own
fields (metadata, conditions, observedGeneration) keep their usual camelCase.

Validation that the API server can do is declared here too (`cel` rules in json_schema_extra),
so the CRD refuses bad objects before the operator ever sees them; the pydantic validators
enforce the same rules for the REST API and the jobrunner.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

GROUP = "beam-backfill.dev"
VERSION = "v1alpha1"
KIND = "BeamBackfill"
PLURAL = "beambackfills"
SINGULAR = "beambackfill"
SHORT_NAMES = ["bbf"]

# Snowflake unquoted identifiers: what a column or a table part may be. Stricter than Snowflake
# itself (no quoted identifiers), which keeps every name safe to splice into SQL.
IDENT_RE = r"^[A-Za-z_][A-Za-z0-9_$]{0,254}$"
# Longer than any address, hash or signature a chain has; bounds the CRD's size and CEL cost.
FILTER_VALUE_MAX_LENGTH = 1024
TABLE_RE = r"^[A-Za-z_][A-Za-z0-9_$]{0,254}(\.[A-Za-z_][A-Za-z0-9_$]{0,254}){0,2}$"
# ISO 8601 date-time with seconds; a missing offset means UTC (the seed's examples have none).
# Years 1970-2999, at most microseconds, offsets under 24 h: every instant CEL accepts is one
# Python (pydantic, the worker's datetime arithmetic) can hold in UTC as well, so that every
# spec the CRD and the API accept can start (a window under a microsecond, or year 1 with an
# offset, passed CEL and then failed in the operator or crashed the worker).
TIMESTAMP_RE = (
    r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
    r"T([01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](\.[0-9]{1,6})?(Z|[+-]([01][0-9]|2[0-3]):[0-5][0-9])?$"
)
K8S_NAME_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


class Phase(StrEnum):
    """status.status: the public API's five values, each written only here."""

    STAGING = "staging"
    TRANSPORTING = "transporting"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({Phase.COMPLETED, Phase.FAILED, Phase.CANCELLED})


class _Model(BaseModel):
    # Unknown fields are an error, not silently dropped: a typo in a manifest must not
    # turn into a backfill that ignores what the user asked for.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def parse_timestamp(value: str) -> datetime:
    """Parse the window's ISO 8601 timestamp; naive values are UTC."""
    if not re.match(TIMESTAMP_RE, value):
        raise ValueError(
            f"{value!r} is not an ISO 8601 timestamp of the years 1970-2999; use YYYY-MM-DDTHH:MM:SS, "
            "optionally with up to 6 fractional digits and Z or a +HH:MM offset"
        )
    dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


# CEL: a timestamp string made RFC 3339 (naive means UTC) so that timestamp() can compare it.
def _cel_ts(field: str) -> str:
    return (
        f"(self.{field}.endsWith('Z') || self.{field}.matches(r'[+-][0-9]{{2}}:[0-9]{{2}}$') "
        f"? timestamp(self.{field}) : timestamp(self.{field} + 'Z'))"
    )


class TimestampWindow(_Model):
    """Backfill by block timestamp: start inclusive, end exclusive."""

    partition_key: Literal["block_timestamp"] = Field(
        description="Column the window applies to: block_timestamp (ISO 8601 start/end) or block (integer block heights)."
    )
    start: str = Field(
        max_length=40,
        description="Inclusive start, ISO 8601 (e.g. 2024-01-01T00:00:00); no offset means UTC. "
        "For partition_key block: an integer block height.",
    )
    end: str = Field(max_length=40, description="Exclusive end, in the same form as start.")

    @field_validator("start", "end")
    @classmethod
    def _iso(cls, v: str) -> str:
        parse_timestamp(v)
        return v

    @model_validator(mode="after")
    def _ordered(self) -> TimestampWindow:
        if parse_timestamp(self.start) >= parse_timestamp(self.end):
            raise ValueError(f"backfill_window.start ({self.start}) must be before end ({self.end})")
        return self

    def bounds(self) -> tuple[datetime, datetime]:
        return parse_timestamp(self.start), parse_timestamp(self.end)


class BlockWindow(_Model):
    """Backfill by block height: start inclusive, end exclusive."""

    partition_key: Literal["block"]
    start: int = Field(ge=0)
    end: int = Field(ge=0)

    @model_validator(mode="after")
    def _ordered(self) -> BlockWindow:
        if self.start >= self.end:
            raise ValueError(f"backfill_window.start ({self.start}) must be less than end ({self.end})")
        return self

    def bounds(self) -> tuple[int, int]:
        return self.start, self.end


BackfillWindow = Annotated[TimestampWindow | BlockWindow, Field(discriminator="partition_key")]

# Rules the generated CRD attaches to backfill_window (start/end are int-or-string there).
WINDOW_CEL = [
    {
        "rule": "self.partition_key != 'block' || (type(self.start) == int && type(self.end) == int)",
        "message": "for partition_key block, start and end must be integer block heights",
    },
    {
        "rule": "self.partition_key != 'block_timestamp' || (type(self.start) == string && type(self.end) == string)",
        "message": 'for partition_key block_timestamp, start and end must be ISO 8601 strings such as "2024-01-01T00:00:00"',
    },
    {
        "rule": f"self.partition_key != 'block_timestamp' || type(self.start) != string || type(self.end) != string "
        f"|| (self.start.matches(r'{TIMESTAMP_RE}') && self.end.matches(r'{TIMESTAMP_RE}'))",
        "message": "start and end must be ISO 8601 timestamps of the years 1970-2999 like 2024-01-01T00:00:00 (optionally with up to 6 fractional digits and Z or +HH:MM)",
    },
    {
        "rule": "self.partition_key != 'block' || type(self.start) != int || type(self.end) != int || (self.start >= 0 && self.start < self.end)",
        "message": "backfill_window.start must be less than end (start is inclusive, end exclusive) and not negative",
    },
    {
        "rule": f"self.partition_key != 'block_timestamp' || type(self.start) != string || type(self.end) != string "
        f"|| !self.start.matches(r'{TIMESTAMP_RE}') || !self.end.matches(r'{TIMESTAMP_RE}') "
        f"|| {_cel_ts('start')} < {_cel_ts('end')}",
        "message": "backfill_window.start must be before end (start is inclusive, end exclusive)",
    },
]


class Filter(_Model):
    """Export only rows whose column is one of values: WHERE column IN (values)."""

    column: str = Field(
        pattern=IDENT_RE, max_length=255, description="Column to filter on; a plain identifier such as token_address."
    )
    values: list[Annotated[str, StringConstraints(max_length=FILTER_VALUE_MAX_LENGTH)] | int] = Field(
        min_length=1,
        max_length=10000,
        description=f"Values to keep: 1 to 10,000, each an integer or a string of at most "
        f"{FILTER_VALUE_MAX_LENGTH} characters. Never spliced into SQL as written: stage_strategy fetch "
        "sends them to Snowflake as bound parameters; unload (COPY INTO, which takes no binds) renders "
        "each as an escaped string literal.",
    )


# A Kubernetes quantity as people write them for CPU and memory: 500m, 2, 1.5, 512Mi, 4G.
QUANTITY_RE = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|Ki|Mi|Gi|Ti|Pi)?$"


class ResourceAmounts(_Model):
    """CPU and memory of each worker container, as in a Pod's resources."""

    cpu: str | None = Field(default=None, pattern=QUANTITY_RE, max_length=20, description="e.g. 500m or 2.")
    memory: str | None = Field(default=None, pattern=QUANTITY_RE, max_length=20, description="e.g. 512Mi or 4Gi.")


class WorkerResources(_Model):
    """Requests and limits of the worker Pods, within the operator's max_worker_resources."""

    requests: ResourceAmounts | None = Field(default=None, description="What the scheduler reserves.")
    limits: ResourceAmounts | None = Field(default=None, description="The most a worker may use.")


class _Destination(_Model):
    # Secret keys this destination reads, if it names a Secret: documented contract between the
    # operator (which maps them into the worker's env) and the jobrunner (which reads them).
    secret_keys: ClassVar[tuple[str, ...]] = ()
    name: str = Field(
        min_length=1, max_length=249, description="A label for this destination, unique per type within the backfill."
    )


class KafkaDestination(_Destination):
    """Kafka topic. Without bootstrap_servers, the operator's managed Kafka is used."""

    secret_keys: ClassVar[tuple[str, ...]] = (
        "sasl_username",
        "sasl_password",
        "sasl_mechanism",
        "security_protocol",
        "ssl_ca_pem",
        "endpoints",
    )
    type: Literal["kafka"]
    name: str = Field(
        pattern=r"^[A-Za-z0-9._-]{1,249}$",
        max_length=249,
        description="Topic to write to; on the operator's managed Kafka the topic is <namespace>.<name>.",
    )
    bootstrap_servers: str | None = Field(
        default=None,
        max_length=2048,
        description="host:port[,host:port] of an external Kafka; omit for the operator's managed Kafka.",
    )
    secret: str | None = Field(
        default=None,
        pattern=K8S_NAME_RE,
        max_length=253,
        description="Name of a Secret in this namespace with keys sasl_username, sasl_password and optionally "
        "sasl_mechanism (default PLAIN), security_protocol (default SASL_SSL) and ssl_ca_pem; its key endpoints "
        "(host:port, *.suffix:port, comma-separated) names the brokers its credentials may be sent to.",
    )

    def topic_in(self, namespace: str) -> str:
        """The topic written. The managed Kafka is shared by every organization, so there a
        topic belongs to its organization: `<namespace>.<name>` (a namespace has no dots, so the
        first dot ends it). An external Kafka is the organization's own: `name` as written."""
        return self.name if self.bootstrap_servers else f"{namespace}.{self.name}"


class WebhookDestination(_Destination):
    """HTTP endpoint that receives rows as JSON batches, optionally HMAC-signed."""

    secret_keys: ClassVar[tuple[str, ...]] = ("hash_key", "ssl_ca_pem")
    type: Literal["webhook"]
    url: str = Field(
        pattern=r"^https?://[^\s]+$", max_length=2048, description="http(s) URL that receives POSTed batches."
    )
    hash_key: str | None = Field(
        default=None,
        pattern=K8S_NAME_RE,
        max_length=253,
        description="Name of a Secret in this namespace whose key hash_key signs each request (HMAC-SHA256); "
        "omit to send unsigned. Its optional key ssl_ca_pem (PEM) is then the only CA trusted for an https url, "
        "for endpoints whose certificate a private CA signs.",
    )


class NatsDestination(_Destination):
    """NATS JetStream subject (the destination name); the stream must cover it."""

    secret_keys: ClassVar[tuple[str, ...]] = ("user", "password", "token", "endpoints")
    type: Literal["nats"]
    name: str = Field(pattern=r"^[A-Za-z0-9_.>*-]{1,249}$", max_length=249, description="Subject to publish to.")
    url: str = Field(
        pattern=r"^(nats|tls)://[^\s]+$",
        max_length=2048,
        description="nats:// or tls:// server URL(s), comma-separated.",
    )
    secret: str | None = Field(
        default=None,
        pattern=K8S_NAME_RE,
        max_length=253,
        description="Name of a Secret with keys user and password, or token; its key endpoints "
        "(host:port, *.suffix:port, comma-separated) names the servers its credentials may be sent to.",
    )


class SnsDestination(_Destination):
    """Amazon SNS topic; FIFO topics get a deduplication id per row."""

    secret_keys: ClassVar[tuple[str, ...]] = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
    type: Literal["sns"]
    topic_arn: str = Field(
        pattern=r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:[0-9]{12}:[A-Za-z0-9_-]{1,256}(\.fifo)?$",
        max_length=300,
        description="ARN of the SNS topic.",
    )
    region: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+$",
        max_length=32,
        description="AWS region; defaults to the one in topic_arn.",
    )
    endpoint_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Override the SNS endpoint (VPC endpoints, testing).",
    )
    secret: str | None = Field(
        default=None,
        pattern=K8S_NAME_RE,
        max_length=253,
        description="Name of a Secret with keys aws_access_key_id, aws_secret_access_key and optionally aws_session_token; omit to use the worker's ambient AWS identity.",
    )


Destination = Annotated[
    KafkaDestination | WebhookDestination | NatsDestination | SnsDestination, Field(discriminator="type")
]
DESTINATION_TYPES = {
    "kafka": KafkaDestination,
    "webhook": WebhookDestination,
    "nats": NatsDestination,
    "sns": SnsDestination,
}


# Transforms (docs/transforms.md): JavaScript run by the transport workers on every row.
TRANSFORMS_MAX = 4
TRANSFORM_SCRIPT_MAX_LENGTH = 32 * 1024
# What the API server and the REST API check of a script, without a JavaScript engine: that it
# declares `transform` (`function transform(`, or `const|let|var transform =`), as a token (not
# the tail of another name or a property). The cheapest test that is never wrong about a script
# that does define it; a script that only mentions it (in a comment, a string) passes here, and
# the workers compile every script (staging before any row is staged, transport before any row
# is delivered) and refuse it there with the line and column.
TRANSFORM_DEFINITION_RE = r"(^|[^A-Za-z0-9_$.])(function\s+transform\s*\(|(const|let|var)\s+transform\s*=)"
TRANSFORM_DEFINITION_MESSAGE = (
    "a transform script must define a function named transform: "
    "function transform(row) { ...; return row; } (or const transform = (row) => ...)"
)


# How every error of a transform begins, in a worker's message and a backfill's error_message.
TRANSFORM_ERROR_PREFIX = "transforms: "


class Transform(_Model):
    """A JavaScript function applied to every row before it is delivered (docs/transforms.md)."""

    type: Literal["v8"] = Field(description="The engine: v8 (JavaScript as V8 runs it, in a sandbox).")
    script: str = Field(
        min_length=1,
        max_length=TRANSFORM_SCRIPT_MAX_LENGTH,
        description="JavaScript defining function transform(row): it gets each row as an object (the columns "
        "as docs/message-format.md delivers them) and returns the row to deliver, null or undefined to drop it, "
        "or an array of rows. No network, file system, environment, timers or modules; the operator sets its "
        "memory and time limits. Checked here for a definition of transform; compiled by the workers before "
        f"any row moves. At most {TRANSFORM_SCRIPT_MAX_LENGTH} characters.",
        json_schema_extra={
            "x-kubernetes-validations": [
                {"rule": f"self.matches(r'{TRANSFORM_DEFINITION_RE}')", "message": TRANSFORM_DEFINITION_MESSAGE}
            ]
        },
    )

    @field_validator("script")
    @classmethod
    def _defines_transform(cls, v: str) -> str:
        if not re.search(TRANSFORM_DEFINITION_RE, v):
            raise ValueError(TRANSFORM_DEFINITION_MESSAGE)
        return v


class BackfillSpec(_Model):
    """What to backfill: a window of a Snowflake table, optionally filtered, to one or more destinations."""

    # Fields a user may change after creation; everything else is immutable (see crd.py).
    mutable_fields: ClassVar[tuple[str, ...]] = ("cancel", "suspend", "retry", "ttl_seconds_after_finished")

    job_name: str = Field(min_length=1, max_length=256, description="Display name of the backfill.")
    table: str = Field(
        pattern=TABLE_RE,
        max_length=767,
        description="Source Snowflake table, e.g. base.assets.erc20_token_transfers (plain identifiers, up to 3 parts).",
    )
    backfill_window: BackfillWindow = Field(
        description="Window to export: partition_key block_timestamp with ISO 8601 start/end, or block with integer start/end. "
        "start is inclusive, end exclusive.",
        json_schema_extra={"x-kubernetes-validations": WINDOW_CEL},
    )
    filter: Filter | None = Field(default=None, description="Optional WHERE column IN (values) on the export query.")
    destinations: list[Destination] = Field(
        min_length=1, max_length=16, description="Where every row goes: kafka, webhook, nats or sns; at least one."
    )
    static_egress_ip: bool = Field(
        default=False, description="Send from the operator's configured static egress IP (for webhook allow-lists)."
    )
    columns: list[Annotated[str, Field(pattern=IDENT_RE, max_length=255)]] | None = Field(
        default=None,
        min_length=1,
        max_length=500,
        description="Columns to export (projection); omit for all columns.",
    )
    transforms: list[Transform] | None = Field(
        default=None,
        max_length=TRANSFORMS_MAX,
        description=f"JavaScript transforms applied in order to every row before it is delivered to any "
        f"destination, each {{type: v8, script}} (docs/transforms.md); at most {TRANSFORMS_MAX}. An extension of "
        "the public API's create body.",
    )
    parallelism: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="Transport workers: Pods running at once, each delivering every parallelism-th chunk "
        "(fewer if there are fewer chunks); defaults to the operator's setting.",
    )
    resources: WorkerResources | None = Field(
        default=None,
        description="CPU and memory requests and limits of every worker Pod, over the operator's defaults "
        "(worker_resources) and within its max_worker_resources.",
    )
    backoff_limit_per_index: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="How many times each transport worker's Pod may fail (evictions do not count) before the "
        "backfill fails; a replacement resumes at the worker's first chunk not yet delivered. Defaults to the "
        "operator's setting and may not exceed its max_backoff_limit_per_index.",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=30 * 86400,
        description="Seconds an attempt may run, from its start (creation, or the retry), suspended time "
        "included; past it the backfill fails and its Jobs are deleted. Defaults to the operator's "
        "default_active_deadline_seconds (none unless set).",
    )
    retry: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="Increment to retry a failed backfill: attempt retry+1 delivers only the chunks not yet "
        "delivered, reusing the staged files if they are still there and staging again if not. Raised while the "
        "backfill runs, it is used if it fails. May change after creation.",
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=366 * 86400,
        description="Seconds after the backfill ends (completed, failed or cancelled) when the operator deletes it, "
        "its Jobs and its staged files; defaults to the operator's backfill_ttl_seconds (off unless set). "
        "May change after creation.",
    )
    cancel: bool = Field(
        default=False,
        description="Set to true to cancel: running Jobs are deleted and status becomes cancelled. May change after creation, as suspend may.",
    )
    suspend: bool = Field(
        default=False,
        description="Set to true to pause: the running Job is suspended and its Pods end, finished chunks stay "
        "delivered, and condition Suspended is True; false resumes with the chunks not yet delivered. Created "
        "true, the backfill starts nothing until resumed. May change after creation.",
    )

    @model_validator(mode="after")
    def _distinct_destinations(self) -> BackfillSpec:
        seen = set()
        for d in self.destinations:
            key = (d.type, d.name)
            if key in seen:
                raise ValueError(f"destination {d.type} {d.name!r} is listed twice")
            seen.add(key)
        return self


SPEC_CEL = [
    {
        "rule": "self.destinations.all(a, self.destinations.exists_one(b, a.type == b.type && a.name == b.name))",
        "message": "each destination (type and name) may be listed only once",
    },
]


def destination_uid(job_id: str, index: int, dest: _Destination) -> str:
    """The per-destination uid the public API reports: stable for a job and its destination."""
    return str(
        uuid.uuid5(uuid.UUID(job_id) if _is_uuid(job_id) else uuid.NAMESPACE_URL, f"{index}:{dest.type}:{dest.name}")
    )


def _is_uuid(s: str) -> bool:
    try:
        uuid.UUID(s)
        return True
    except ValueError:
        return False


def workflow_id(namespace: str, job_id: str) -> str:
    return f"beam-backfill-{namespace}-{job_id}"


class Condition(BaseModel):
    """A Kubernetes-standard condition (metav1.Condition)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = ""
    message: str = ""
    lastTransitionTime: str | None = None
    observedGeneration: int | None = None


class BackfillStatus(BaseModel):
    """What the operator reports. status is absent until the first reconcile, then a Phase."""

    # Read back from the apiserver, whose structural schema prunes unknown fields anyway.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    status: Phase | None = Field(
        default=None,
        description="staging, transporting, completed, failed or cancelled; absent before the first reconcile.",
    )
    job_id: str | None = Field(default=None, description="The resource's uid; the public API's job_id.")
    workflow_id: str | None = Field(default=None, description="beam-backfill-<namespace>-<job_id>.")
    num_chunks: int | None = Field(default=None, description="Parquet files staged; null while staging.")
    chunks_left: int | None = Field(default=None, description="Chunks still to deliver; counts down to 0.")
    num_rows: int | None = Field(
        default=None, description="Rows staged (the window's rows, after the filter); null while staging."
    )
    rows_delivered: int | None = Field(
        default=None,
        description="Rows of the chunks that reached every destination; counts up to num_rows, and is num_rows "
        "once completed. While transporting it is the sum of the rows the progress objects of delivered chunks "
        "name, read only while transport workers have more than one chunk each (with one chunk per worker it "
        "stays where it was until completion); so it may lag chunks_left, and never counts a row not delivered. "
        "Kept by a failure, a cancel or a retry that reuses the staged files; null while staging.",
    )
    error_message: str | None = Field(default=None, description="Why the backfill failed; null otherwise.")
    time_created: str | None = Field(default=None, description="ISO 8601 UTC.")
    time_completed: str | None = Field(default=None, description="ISO 8601 UTC; null until the backfill ends.")
    time_staging_started: str | None = Field(
        default=None,
        description="ISO 8601 UTC: when the attempt's staging Job was first created; null until then. A retry "
        "that stages again sets it again; one that reuses the staged files keeps it.",
    )
    time_transporting_started: str | None = Field(
        default=None,
        description="ISO 8601 UTC: when status became transporting (staging finished), so staging took this "
        "minus time_staging_started and the transport phase ends at time_completed. Null if it never "
        "transported (an empty window completes from staging). A retry that reuses the staged files keeps it "
        "(the retry's own start is the Failed condition's lastTransitionTime); one that stages again clears it.",
    )
    staged_files_deleted: bool | None = Field(
        default=None, description="True once the staged chunks were removed (retention)."
    )
    attempt: int | None = Field(
        default=None, description="The attempt under way or last made: 1, and one more for each retry (spec.retry)."
    )
    observedGeneration: int | None = None
    conditions: list[Condition] = Field(default_factory=list)

    def document(self) -> dict[str, Any]:
        """The status as written (a JSON merge patch deletes nulls, so the stored one has none)."""
        return self.model_dump(mode="json", exclude_none=True)


def utc_iso(dt: datetime) -> str:
    """ISO 8601 UTC with Z, second precision: the public API's timestamp format."""
    return dt.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def spec_from_dict(data: dict[str, Any]) -> BackfillSpec:
    return BackfillSpec.model_validate(data)
