"""Every setting of the operator, from environment variables (the chart sets them from values.config).

Each field has a BEAM_<FIELD> variable (pydantic-settings): lists are comma-separated, maps and
egress are JSON. Read once at start-up: a change means a rollout of the operator Deployment.
docs/operations.md explains the tuning fields and the figures behind their defaults.
"""

from __future__ import annotations

import ipaddress
from typing import Annotated, Any

from pydantic import BaseModel, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from beam_contract.worker import DEFAULT_CONNECT_TIMEOUT_S, StageStrategy


class EgressConfig(BaseModel):
    """Where Pods must run to leave through the static egress IP (static_egress_ip: true)."""

    pod_labels: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def configured(self) -> bool:
        return bool(self.pod_labels or self.node_selector or self.tolerations)


class OperatorConfig(BaseSettings):
    # An empty variable means "the default", as the chart renders a null value.
    model_config = SettingsConfigDict(env_prefix="BEAM_", env_ignore_empty=True, extra="ignore")

    # --- what backfills may do and where their data goes ---------------------------------
    # Tables a backfill may read; empty means any. Entries compare case-insensitively.
    allowed_tables: Annotated[list[str], NoDecode] = Field(default_factory=list)
    staging_bucket: str = "beam-backfill-staging"
    staging_prefix: str = "backfills"
    # Only for emulators (dev stack, tests): passed to workers as STORAGE_EMULATOR_HOST.
    gcs_endpoint: str | None = None
    jobrunner_image: str = "beam-backfill/jobrunner:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    worker_service_account: str | None = None
    default_parallelism: int = 4
    stage_strategy: StageStrategy = StageStrategy.UNLOAD
    chunk_target_bytes: int = 64 * 1024 * 1024
    unload_stage: str | None = None
    # Secret in each backfill's namespace (not the operator's) with the Snowflake connection, so
    # every organization brings its own warehouse credentials.
    snowflake_secret: str = "beam-snowflake"
    # A destination's `secret` or `hash_key` may only name a Secret whose name starts with this:
    # Secrets an administrator made for destinations (docs/security.md). The Snowflake Secret
    # can never carry it (checked at start), so no destination can send the warehouse's
    # credentials anywhere.
    destination_secret_prefix: str = Field(default="beam-destination-", min_length=1)
    # Organizations (namespaces) whose SNS destinations may go without a Secret, on the workers'
    # ambient cloud identity (IRSA, instance role). That identity is the same in every namespace,
    # so it is off for all unless an administrator names the organization here.
    ambient_identity_namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    managed_kafka_bootstrap: str | None = None
    # What destinations may reach (docs/security.md, "What a destination may reach"): workers
    # refuse loopback, link-local, private, multicast and these cluster CIDRs (the pod and service
    # ranges, which may be public addresses) unless a host name, "*.suffix" or CIDR is allowed
    # here. The managed Kafka and the staging store are the platform's, never refused.
    destination_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    cluster_cidrs: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # A Kafka (SASL) or NATS destination's Secret must name, in its key `endpoints`, where its
    # credentials may be sent; those protocols send them in clear to whatever server the spec
    # names (docs/security.md, "A Secret is bound to its endpoints"). False: as before, anywhere.
    secret_endpoints_required: bool = True
    # One retry of a chunk, then the index fails: a bad chunk must not loop for hours.
    backoff_limit_per_index: int = 1
    staging_backoff_limit: int = 1
    # spec.active_deadline_seconds of a backfill that sets none; None: no deadline.
    default_active_deadline_seconds: int | None = Field(default=None, ge=1)
    # A worker Pod waiting this long for a reason that does not pass by itself (an image that
    # cannot be pulled, no node that fits, a Pod the cluster refuses to create) fails the
    # backfill with the reason, instead of leaving it in staging or transporting forever.
    stuck_pod_seconds: float = Field(default=300.0, gt=0)
    # Unschedulable Pods wait longer: a burst beyond the cluster's capacity ("Too many pods",
    # "Insufficient cpu") passes as Pods finish or an autoscaler adds nodes; a request no node
    # can ever fit reads the same, and ends after this (a burst on one node waited minutes for
    # Pod slots: docs/benchmarks.md, "Finished backfills expiring", "The first run also found a
    # defect"). spec.active_deadline_seconds bounds the whole.
    unschedulable_seconds: float = Field(default=3600.0, gt=0)
    # Staging that has run this long (from its Job's creation, its Pod running) gets its
    # transport Job at once: its Pods start and wait for the manifest, so no Pod starts between
    # the phases (docs/worker-contract.md). A shorter staging gets it once it has ended, with no
    # more workers than chunks. None: always after staging, no transport Pod ever waits.
    transport_prestart_seconds: float | None = Field(default=5.0, ge=0)
    # How often chunks_left is counted from the bucket's progress objects while transport
    # workers have more than one chunk each, and the most such reads per second over all
    # backfills (each is one object listing): more backfills transporting, slower counts.
    progress_interval_seconds: float = Field(default=1.0, gt=0)
    progress_reads_per_second: float = Field(default=50.0, gt=0)
    job_ttl_seconds: int = 3600
    # Previews (BeamPreview, docs/console.md): the longest a preview Job may run, how long a
    # finished BeamPreview stays before the operator deletes it (the REST API deletes its own at
    # once), and how many preview Jobs may run at once over all organizations.
    preview_timeout_seconds: float = Field(default=60.0, gt=0)
    preview_ttl_seconds: float = Field(default=600.0, ge=0)
    max_running_previews: int = Field(default=10, ge=1)
    # Seconds after a backfill ends when the operator deletes the BeamBackfill itself (and so
    # its Jobs and staged files), unless its spec.ttl_seconds_after_finished says otherwise.
    # None keeps finished backfills until someone deletes them, as Kubernetes keeps Jobs.
    backfill_ttl_seconds: int | None = Field(default=None, ge=0)
    # How long staged parquet stays after completion; 0 deletes at once. Failed and cancelled
    # backfills keep theirs until the resource is deleted, for debugging.
    staged_retention_seconds: int = 0
    status_interval_seconds: float = 1.0
    connect_timeout_seconds: int = DEFAULT_CONNECT_TIMEOUT_S
    # What one organization (namespace) may hold at once: live backfills (not completed, failed
    # or cancelled) and the bytes of their specs. A backfill beyond either ends `failed` before
    # any Job (reason NamespaceFull). CEL cannot count; a ResourceQuota on
    # count/beambackfills.beam-backfill.dev refuses at create (docs/security.md). None: no limit.
    max_live_backfills_per_namespace: int | None = Field(default=200, ge=1)
    max_spec_bytes_per_namespace: int | None = Field(default=64 * 1024 * 1024, ge=1)
    # Every worker container's requests and limits unless its spec.resources says otherwise: a
    # Pod without them is BestEffort, evicted first and free to take a node's memory (issue 25).
    # No CPU limit: throttling slows a chunk without protecting anyone a request does not.
    worker_resources: dict[str, Any] = Field(
        default_factory=lambda: {"requests": {"cpu": "250m", "memory": "512Mi"}, "limits": {"memory": "2Gi"}}
    )
    # The most a backfill's spec.resources may ask for, per request and limit: one organization
    # must not reserve a node's worth of CPU per chunk. Keys cpu and memory; an absent key is unbounded.
    max_worker_resources: dict[str, str] = Field(default_factory=lambda: {"cpu": "4", "memory": "16Gi"})
    # The most spec.backoff_limit_per_index may be: every retry re-reads and re-sends a chunk.
    max_backoff_limit_per_index: int = Field(default=5, ge=0)
    # spec.transforms (docs/transforms.md): the JavaScript heap's limit of a worker's sandbox and
    # how long one batch of rows (transform.BATCH_ROWS) may take in it; past either the chunk
    # fails for good. The sandbox's memory comes on top of the worker's own: a worker Pod's
    # memory limit must hold both (about this plus 0.5 GiB for the worker).
    transform_memory_mib: int = Field(default=256, ge=16, le=16384)
    transform_timeout_seconds: float = Field(default=10.0, gt=0, le=3600)
    # Extra env for every worker (tuning such as BEAM_CHUNK_ROW_GROUP_ROWS, log levels); never
    # secrets, which reach workers only as secretKeyRef.
    worker_env: dict[str, str] = Field(default_factory=dict)
    egress: EgressConfig = Field(default_factory=EgressConfig)

    # --- the operator process ------------------------------------------------------------
    # Namespaces to serve; empty: every namespace (the default, each one an organization). With
    # a list, the operator watches only those and needs no cluster-scoped permission (the chart's
    # watchNamespaces renders Roles there instead of ClusterRoles).
    watch_namespaces: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # One active replica among several (beam_operator.leader): the Lease's namespace and name.
    # Off (None) for a lone operator process; the chart always sets it.
    leader_election_lease: str | None = None
    leader_election_namespace: str | None = None
    metrics_port: int = 8080
    log_level: str = "INFO"
    # kopf's /healthz; empty in the environment keeps the default, so the chart always sets it.
    liveness_endpoint: str = "http://0.0.0.0:8081/healthz"
    # Reconcile workers. 32: with the API calls on the event loop, twice the workers cut what a
    # new backfill waits for in a burst to a fraction, for a few MB (docs/benchmarks.md, "The
    # controller's API calls on asyncio").
    workers: int = 32
    # Connections of the controller's API session; 0: 2 per worker plus one per Event lane.
    api_connections: int = 0
    api_timeout_seconds: float = 30.0
    # Events waiting for the API server beyond this are dropped (and counted), not queued.
    event_backlog: int = 1000
    # kopf's own session (its watches): bounded, as kopf's default is unlimited.
    kopf_connections: int = 20
    # The apiserver ends each watch after this; a restarted apiserver is noticed within it.
    watch_server_timeout: int = 300
    watch_client_timeout: int = 330
    # Paged lists: an unpaged list of every Job arrived as one response, all of it in memory at
    # once (docs/benchmarks.md, "Earlier figures behind the operator's settings").
    # 50: a page of backfills with 1 MB filters is 50 MB of JSON (kopf holds one page at a time),
    # what a restarted operator reads before its cache slims them (issue 25).
    list_chunk_size: int = 50
    # How long kopf keeps an idle object's worker (and its last body); 5 s by default.
    kopf_idle_seconds: float = 0.5

    @field_validator(
        "allowed_tables",
        "ambient_identity_namespaces",
        "destination_allow",
        "cluster_cidrs",
        "watch_namespaces",
        mode="before",
    )
    @classmethod
    def _comma_separated(cls, v: Any) -> Any:
        return [t.strip() for t in v.split(",") if t.strip()] if isinstance(v, str) else v

    @model_validator(mode="after")
    def _snowflake_secret_is_never_a_destination_secret(self) -> OperatorConfig:
        if self.snowflake_secret.startswith(self.destination_secret_prefix):
            raise ValueError(
                f"snowflake_secret {self.snowflake_secret!r} starts with destination_secret_prefix "
                f"{self.destination_secret_prefix!r}: any destination could then send the warehouse credentials "
                "to a host of its choice; rename the Secret or change the prefix"
            )
        return self

    @field_validator("cluster_cidrs")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for c in v:
            try:
                ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise ValueError(f"cluster_cidrs: {c!r} is not a CIDR such as 10.0.0.0/8") from None
        return v

    def destination_secret_allowed(self, name: str) -> bool:
        return name.startswith(self.destination_secret_prefix)

    def table_allowed(self, table: str) -> bool:
        return not self.allowed_tables or table.lower() in {t.lower() for t in self.allowed_tables}
