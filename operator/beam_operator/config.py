"""Operator configuration, from environment variables (the chart sets them from values.yaml).

Every setting has a BEAM_ variable; lists are comma-separated and maps are JSON. Read once at
start-up: a change means a rollout of the operator Deployment.
"""

from __future__ import annotations

import json
import os
from typing import Any

from pydantic import BaseModel, Field


class EgressConfig(BaseModel):
    """Where Pods must run to leave through the static egress IP (static_egress_ip: true)."""

    pod_labels: dict[str, str] = Field(default_factory=dict)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def configured(self) -> bool:
        return bool(self.pod_labels or self.node_selector or self.tolerations)


class OperatorConfig(BaseModel):
    # Tables a backfill may read; empty means any. Entries compare case-insensitively.
    allowed_tables: list[str] = Field(default_factory=list)
    staging_bucket: str = "beam-backfill-staging"
    staging_prefix: str = "backfills"
    # Only for emulators (dev stack, tests): passed to workers as STORAGE_EMULATOR_HOST.
    gcs_endpoint: str | None = None
    jobrunner_image: str = "beam-backfill/jobrunner:0.1.0"
    image_pull_policy: str = "IfNotPresent"
    worker_service_account: str | None = None
    default_parallelism: int = 4
    stage_strategy: str = "unload"
    chunk_target_bytes: int = 64 * 1024 * 1024
    unload_stage: str | None = None
    # Secret (in the operator's namespace? no: in each backfill's namespace) with the Snowflake
    # connection, so every organization brings its own warehouse credentials.
    snowflake_secret: str = "beam-snowflake"
    managed_kafka_bootstrap: str | None = None
    # One retry of a chunk, then the index fails: a bad chunk must not loop for hours.
    backoff_limit_per_index: int = 1
    staging_backoff_limit: int = 1
    job_ttl_seconds: int = 3600
    # How long staged parquet stays after completion; 0 deletes at once. Failed and cancelled
    # backfills keep theirs until the resource is deleted, for debugging.
    staged_retention_seconds: int = 0
    status_interval_seconds: float = 1.0
    connect_timeout_seconds: int = 30
    worker_resources: dict[str, Any] = Field(default_factory=dict)
    # Extra env for every worker (tuning such as BEAM_CHUNK_ROW_GROUP_ROWS, log levels); never
    # secrets, which reach workers only as secretKeyRef.
    worker_env: dict[str, str] = Field(default_factory=dict)
    egress: EgressConfig = Field(default_factory=EgressConfig)
    metrics_port: int = 8080

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> "OperatorConfig":
        env = dict(os.environ if env is None else env)
        data: dict[str, Any] = {}
        for name, field in cls.model_fields.items():
            raw = env.get(f"BEAM_{name.upper()}")
            if raw is None or raw == "":
                continue
            if name == "allowed_tables":
                data[name] = [t.strip() for t in raw.split(",") if t.strip()]
            elif name in ("egress", "worker_resources", "worker_env"):
                data[name] = json.loads(raw)
            else:
                data[name] = raw
        return cls.model_validate(data)

    def table_allowed(self, table: str) -> bool:
        return not self.allowed_tables or table.lower() in {t.lower() for t in self.allowed_tables}
