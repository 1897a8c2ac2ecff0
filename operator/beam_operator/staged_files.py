"""A backfill's staged files as the operator sees them: deleting them (the finalizer, retention
after success), whether the manifest is still there (a retry), and the transport workers'
progress objects (chunks_left, rows_delivered).

google-cloud-storage rather than pyarrow's GCS filesystem, which the jobrunner uses: importing
pyarrow grew the operator's RSS at its first deletion by several times what google-cloud-storage
costs (docs/benchmarks.md, "Operator at scale": "What the benchmark changed in the operator"),
and the operator's image has no pyarrow at all.
"""

from __future__ import annotations

import os
from functools import lru_cache

from beam_contract.staging import MANIFEST, PROGRESS, chunk_of_progress, deletable_prefix, rows_of_progress
from beam_contract.worker import Env


class StagedFilesError(Exception):
    """The bucket could not be listed or an object not deleted; the caller retries."""


@lru_cache(maxsize=1)
def _client():
    from google.cloud import storage

    if os.environ.get(Env.STORAGE_EMULATOR_HOST):
        # fake-gcs-server (tests, the dev stack) takes no credentials and has no project.
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="beam-backfill", credentials=AnonymousCredentials())
    return storage.Client()  # Application Default Credentials: workload identity in a cluster


def delete_staged(staging_uri: str, timeout: float = 30.0) -> int:
    """Delete every object under a job's staging prefix; return how many were deleted.

    Raises StagingLayoutError (beam_contract.staging) for a URI that is not a job's prefix.
    """
    from google.api_core import exceptions

    bucket, prefix = deletable_prefix(staging_uri)
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
        raise StagedFilesError(f"cannot delete staged files under {staging_uri}: {e}") from None
    return n


def manifest_exists(staging_uri: str, timeout: float = 30.0) -> bool:
    """Whether a job's staged manifest is still there: a retry reuses the staged chunks then."""
    from google.api_core import exceptions

    bucket, prefix = deletable_prefix(staging_uri)
    try:
        return _client().bucket(bucket).blob(prefix + MANIFEST).exists(timeout=timeout)
    except (exceptions.GoogleAPICallError, OSError) as e:
        raise StagedFilesError(f"cannot look for the staged manifest under {staging_uri}: {e}") from None


def chunks_with_progress(staging_uri: str, timeout: float = 30.0) -> dict[int, int | None]:
    """Chunks whose progress object says they reached every destination, each with the rows its
    custom metadata names (None without: a worker of an earlier release). One listing: a GCS
    listing returns each object's custom metadata, so no object is read."""
    from google.api_core import exceptions

    bucket, prefix = deletable_prefix(staging_uri)
    try:
        blobs = _client().list_blobs(bucket, prefix=f"{prefix}{PROGRESS}/", timeout=timeout)
        return {c: rows_of_progress(b.metadata) for b in blobs if (c := chunk_of_progress(b.name)) is not None}
    except exceptions.NotFound:
        return {}
    except (exceptions.GoogleAPICallError, OSError) as e:
        raise StagedFilesError(f"cannot list the progress of {staging_uri}: {e}") from None
