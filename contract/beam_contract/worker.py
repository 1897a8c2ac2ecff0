"""The operator <-> jobrunner contract: what a worker Pod gets in, and what it gives back.

The operator writes these names into the Jobs it creates (beam_operator.child_jobs) and the
jobrunner reads them (beam_jobrunner.config, .stage, .sinks); docs/worker-contract.md explains
them for people. Secrets reach a worker only as `secretKeyRef` env entries named here.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from pydantic import BaseModel


class Command(StrEnum):
    """`beam-jobrunner <command>`."""

    STAGE = "stage"
    TRANSPORT = "transport"
    PREVIEW = "preview"  # count, measure and sample a window (beam_contract.preview); no files written


class Env(StrEnum):
    """Environment variables the operator sets on every worker, or on one kind of worker."""

    SPEC = "BEAM_SPEC"  # the BackfillSpec as JSON, when it is small (SPEC_INLINE_MAX_BYTES)
    SPEC_FILE = "BEAM_SPEC_FILE"  # otherwise: a gzip'd JSON file, mounted from the spec ConfigMap
    JOB_ID = "BEAM_JOB_ID"  # the resource's uid, the public job_id
    NAMESPACE = "BEAM_NAMESPACE"  # the organization
    BACKFILL = "BEAM_BACKFILL"  # the BeamBackfill's name: for the worker's log lines
    STAGING_URI = "BEAM_STAGING_URI"  # staging.job_staging_uri()
    CONNECT_TIMEOUT_S = "BEAM_CONNECT_TIMEOUT_S"
    STORAGE_EMULATOR_HOST = "STORAGE_EMULATOR_HOST"  # only with an emulator (dev stack, tests)
    # stage
    STAGE_STRATEGY = "BEAM_STAGE_STRATEGY"  # StageStrategy
    CHUNK_TARGET_BYTES = "BEAM_CHUNK_TARGET_BYTES"
    UNLOAD_STAGE = "BEAM_UNLOAD_STAGE"
    # transport
    COMPLETION_INDEX = "JOB_COMPLETION_INDEX"  # set by the Indexed Job: the worker (worker_chunks)
    TRANSPORT_WORKERS = "BEAM_TRANSPORT_WORKERS"  # the Job's completions: how many workers share the chunks
    MANIFEST_URI = "BEAM_MANIFEST_URI"
    # "true": the Job started while staging runs; wait for the manifest instead of failing
    # without it (the staging Job fails, is cancelled or suspended: the operator ends this one).
    AWAIT_MANIFEST = "BEAM_AWAIT_MANIFEST"
    KAFKA_BOOTSTRAP = "BEAM_KAFKA_BOOTSTRAP"  # the managed Kafka
    # What a destination may reach (docs/security.md): comma-separated host names ("*.x.y" for
    # a suffix) and CIDRs that are allowed although inward, and the cluster's pod and service
    # CIDRs, refused like private ranges even where they are public addresses.
    DESTINATION_ALLOW = "BEAM_DESTINATION_ALLOW"
    STAGING_KEY = "BEAM_STAGING_KEY"  # the backfill's staged-data key, base64 (beam_jobrunner.seal)
    # "false": a Kafka or NATS Secret without the key `endpoints` may be sent anywhere (config.secret_endpoints_required)
    SECRET_ENDPOINTS_REQUIRED = "BEAM_SECRET_ENDPOINTS_REQUIRED"
    CLUSTER_CIDRS = "BEAM_CLUSTER_CIDRS"
    # spec.transforms (docs/transforms.md): the JavaScript heap's limit and the time one batch
    # may take, from the operator's transform_memory_mib and transform_timeout_seconds; set on
    # both workers of a backfill with transforms (staging compiles them, transport runs them).
    TRANSFORM_MEMORY_MIB = "BEAM_TRANSFORM_MEMORY_MIB"
    TRANSFORM_TIMEOUT_S = "BEAM_TRANSFORM_TIMEOUT_S"
    # Kubernetes' default; a test runs the worker outside a Pod with its own path.
    TERMINATION_MESSAGE_PATH = "TERMINATION_MESSAGE_PATH"


class StageStrategy(StrEnum):
    UNLOAD = "unload"  # Snowflake writes the parquet files (COPY INTO @stage)
    FETCH = "fetch"  # the worker reads Arrow batches and writes the parquet files


class ExitCode(IntEnum):
    """A worker's exit code; the Jobs' podFailurePolicy acts on PERMANENT."""

    OK = 0
    BUG = 1  # unexpected error: retried up to backoffLimitPerIndex
    PERMANENT = 2  # bad input, 4xx, missing table: the index (or staging) fails at once
    TRANSIENT = 3  # a broker or endpoint stayed unreachable through the worker's own retries


# Linux caps one env string at 128 KiB (MAX_ARG_STRLEN) and all of them with argv at a few
# MiB: a spec above this goes in a ConfigMap of the backfill's, gzip'd, mounted as a file.
SPEC_INLINE_MAX_BYTES = 32 * 1024
SPEC_CONFIGMAP_KEY = "spec.json.gz"
SPEC_MOUNT_DIR = "/etc/beam-spec"
# What a ConfigMap may hold (the apiserver refuses more), less room for its metadata.
SPEC_CONFIGMAP_MAX_BYTES = 1024 * 1024 - 4096

# A failed worker's termination message: its one-line error, then this line, then its last log
# lines (secret values masked), for when the Pod and its logs are gone (the Jobs' TTL). The
# kubelet keeps 4096 bytes of a termination message.
LOG_TAIL_MARK = "--- last log lines ---"
TERMINATION_MESSAGE_MAX_BYTES = 4096
# A transport worker delivers many chunks: the line after its error names the one that failed.
FAILED_CHUNK_PREFIX = "failed chunk: "


def worker_chunks(worker: int, workers: int, num_chunks: int) -> range:
    """The chunks transport worker `worker` of `workers` delivers, in this order: every
    `workers`-th from its own index. Fixed by the three numbers, so a replacement Pod of the same
    index (a retry, an eviction, a resume) takes up exactly the chunks its predecessor had."""
    return range(worker, num_chunks, max(workers, 1))


def failure_message(error: str, chunk: int | None = None) -> str:
    """The head of a failed worker's termination message (its log tail follows)."""
    return error if chunk is None else f"{error}\n{FAILED_CHUNK_PREFIX}{chunk}"


def parse_failure(message: str) -> tuple[str, int | None, list[str]]:
    """A failed worker's termination message: (error line, failed chunk or None, log lines)."""
    head, mark, tail = message.partition(LOG_TAIL_MARK)
    lines = [line.strip() for line in head.strip().splitlines() if line.strip()]
    chunk = None
    if lines and lines[-1].startswith(FAILED_CHUNK_PREFIX) and lines[-1][len(FAILED_CHUNK_PREFIX) :].isdigit():
        chunk = int(lines.pop()[len(FAILED_CHUNK_PREFIX) :])
    logged = [line.strip() for line in tail.splitlines() if line.strip()] if mark else []
    return " ".join(lines), chunk, logged


DEFAULT_CONNECT_TIMEOUT_S = 30
DEFAULT_TERMINATION_MESSAGE_PATH = "/dev/termination-log"

# Keys of the Snowflake Secret (the operator's `snowflake_secret`, one per organization's
# namespace); each reaches the staging worker as snowflake_env(key).
SNOWFLAKE_SECRET_KEYS = (
    "account",
    "user",
    "password",
    "host",
    "port",
    "protocol",
    "warehouse",
    "role",
    "database",
    "schema",
)
SNOWFLAKE_REQUIRED_KEYS = ("account", "user", "password")


def snowflake_env(key: str) -> str:
    return f"BEAM_SNOWFLAKE_{key.upper()}"


def destination_env(index: int, key: str) -> str:
    """Env name of Secret key `key` of the spec's destination `index` (its model's secret_keys)."""
    return f"BEAM_DEST_{index}_{key.upper()}"


class StagingResult(BaseModel):
    """The staging worker's termination message on success (one line of JSON)."""

    num_chunks: int
    num_rows: int = 0
    manifest: str = ""
