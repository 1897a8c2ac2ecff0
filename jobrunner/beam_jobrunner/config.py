"""The worker's inputs, all from the environment (docs/worker-contract.md)."""

from __future__ import annotations

import gzip
import json
import os
from dataclasses import dataclass

from beam_contract.model import BackfillSpec
from beam_contract.preview import PreviewSpec
from beam_contract.worker import DEFAULT_CONNECT_TIMEOUT_S, DEFAULT_TERMINATION_MESSAGE_PATH, Env
from beam_jobrunner.errors import PermanentError

DEFAULT_CHUNK_TARGET_BYTES = 128 * 2**20


def env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(name)
    return value if value not in (None, "") else default


def require(name: str) -> str:
    value = env(name)
    if value is None:
        raise PermanentError(f"configuration: environment variable {name} is not set")
    return value


def _spec_document() -> tuple[str | bytes, str]:
    """The spec's JSON, from the env or, for a large spec, the mounted ConfigMap's file."""
    path = env(Env.SPEC_FILE)
    if path is None:
        return require(Env.SPEC), Env.SPEC
    try:
        with open(path, "rb") as f:
            return gzip.decompress(f.read()), path
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise PermanentError(f"configuration: cannot read the spec from {path} ({Env.SPEC_FILE}): {e}") from None


def _spec(model, what: str):
    """The worker's spec as `model`, or a PermanentError naming every bad field."""
    raw, where = _spec_document()
    try:
        return model.model_validate(json.loads(raw))
    except Exception as e:  # pydantic's message lists every bad field: the user needs it
        raise PermanentError(f"configuration: {where} is not a valid {what} spec: {e}") from None


def _connect_timeout() -> float:
    return float(env(Env.CONNECT_TIMEOUT_S, str(DEFAULT_CONNECT_TIMEOUT_S)))


@dataclass
class Common:
    spec: BackfillSpec
    job_id: str
    namespace: str
    staging_uri: str
    connect_timeout: float

    @classmethod
    def from_env(cls) -> Common:
        spec = _spec(BackfillSpec, "BeamBackfill")
        staging = require(Env.STAGING_URI)
        if not staging.startswith("gs://"):
            raise PermanentError(f"configuration: {Env.STAGING_URI} must be a gs:// URI, got {staging!r}")
        return cls(
            spec=spec,
            job_id=require(Env.JOB_ID),
            namespace=env(Env.NAMESPACE, "default"),
            staging_uri=staging.rstrip("/") + "/",
            connect_timeout=_connect_timeout(),
        )


@dataclass
class PreviewConfig:
    """`beam-jobrunner preview`'s inputs: a PreviewSpec, the Snowflake env (read when it
    connects, as staging's) and the connect timeout. No staging URI, key or bucket: a preview
    writes no files (beam_contract.preview)."""

    spec: PreviewSpec
    job_id: str
    namespace: str
    connect_timeout: float

    @classmethod
    def from_env(cls) -> PreviewConfig:
        spec = _spec(PreviewSpec, "BeamPreview")
        return cls(
            spec=spec,
            job_id=env(Env.JOB_ID, ""),  # the preview's uid: only for the log lines
            namespace=env(Env.NAMESPACE, "default"),
            connect_timeout=_connect_timeout(),
        )


def termination_path() -> str:
    return env(Env.TERMINATION_MESSAGE_PATH, DEFAULT_TERMINATION_MESSAGE_PATH)
