"""The worker's inputs, all from the environment (docs/worker-contract.md)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from beam_operator.model import BackfillSpec

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


@dataclass
class Common:
    spec: BackfillSpec
    job_id: str
    namespace: str
    staging_uri: str
    connect_timeout: float

    @classmethod
    def from_env(cls) -> "Common":
        raw = require("BEAM_SPEC")
        try:
            spec = BackfillSpec.model_validate(json.loads(raw))
        except Exception as e:  # pydantic's message lists every bad field: the user needs it
            raise PermanentError(f"configuration: BEAM_SPEC is not a valid BeamBackfill spec: {e}") from None
        staging = require("BEAM_STAGING_URI")
        if not staging.startswith("gs://"):
            raise PermanentError(f"configuration: BEAM_STAGING_URI must be a gs:// URI, got {staging!r}")
        return cls(
            spec=spec,
            job_id=require("BEAM_JOB_ID"),
            namespace=env("BEAM_NAMESPACE", "default"),
            staging_uri=staging.rstrip("/") + "/",
            connect_timeout=float(env("BEAM_CONNECT_TIMEOUT_S", "30")),
        )


def termination_path() -> str:
    return env("TERMINATION_MESSAGE_PATH", "/dev/termination-log")
