"""Deleting a job's staged objects, for the operator and `beam-jobrunner cleanup`.

Not through storage.py: that module is pyarrow's GCS filesystem, and importing it grew the
operator's RSS by about 30 MB at its first cleanup (docs/benchmarks.md, "Operator at scale").
google-cloud-storage costs about 6 MB and is already a dependency.
"""

from __future__ import annotations

import os
from functools import lru_cache

from beam_jobrunner.errors import PermanentError, TransientError


@lru_cache(maxsize=1)
def _client():
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        # fake-gcs-server (tests, the dev stack) takes no credentials and has no project.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="beam-backfill", credentials=AnonymousCredentials())
    return storage.Client()  # Application Default Credentials: workload identity in a cluster


def split(staging_uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b/"), refusing anything shallower than a job's prefix.

    A misconfigured URI must not wipe a bucket: a job's prefix is [<prefix>/]<namespace>/<job_id>
    (the operator's staging prefix may be empty), so at least two segments below the bucket.
    """
    if not staging_uri.startswith("gs://"):
        raise PermanentError(f"cleanup: {staging_uri!r} is not a gs:// URI")
    parts = [p for p in staging_uri[len("gs://"):].split("/") if p]
    if len(parts) < 3:
        raise PermanentError(f"cleanup: refusing to delete {staging_uri!r}: expected gs://<bucket>/[<prefix>/]<namespace>/<job_id>/")
    return parts[0], "/".join(parts[1:]) + "/"


def delete_staged(staging_uri: str) -> int:
    """Delete every object under a job's staging prefix; return how many were deleted."""
    from google.api_core import exceptions

    bucket, prefix = split(staging_uri)
    timeout = float(os.environ.get("BEAM_CONNECT_TIMEOUT_S", "30"))
    client = _client()
    n = 0
    try:
        for blob in list(client.list_blobs(bucket, prefix=prefix, timeout=timeout)):
            try:
                blob.delete(timeout=timeout)
                n += 1
            except exceptions.NotFound:
                pass  # deleted by an earlier attempt that died before reporting
    except exceptions.NotFound:
        return n  # no bucket: nothing was staged there
    except (exceptions.GoogleAPICallError, OSError) as e:
        raise TransientError(f"cleanup: cannot delete under {staging_uri}: {e}") from None
    return n
