"""Where a backfill's staged files live, and the guard on deleting them.

    gs://<bucket>/[<prefix>/]<namespace>/<job_id>/   job_staging_uri()
      chunks/chunk-00000.parquet ...                 the staged rows (fetch), or Snowflake's files (unload)
      manifest.json                                  what `stage` produced; `transport` reads it
      delivered/<destination index>/<chunk>          a chunk reached a non-Kafka destination
      progress/<chunk>                               a chunk reached every destination: what the
                                                     operator counts for chunks_left; its custom
                                                     metadata {"rows": "<n>"} for rows_delivered

The operator computes the URI and deletes the prefix; the jobrunner writes and reads under it.
"""

from __future__ import annotations

CHUNKS = "chunks"
MANIFEST = "manifest.json"
DELIVERED = "delivered"
PROGRESS = "progress"


class StagingLayoutError(ValueError):
    """A URI that is not a job's staging prefix."""


def join(base: str, *parts: str) -> str:
    return base.rstrip("/") + "/" + "/".join(p.strip("/") for p in parts)


def job_path(namespace: str, job_id: str) -> str:
    """A job's folder below the staging root (an unload stage's URL is that root)."""
    return f"{namespace}/{job_id}"


def job_staging_uri(bucket: str, prefix: str, namespace: str, job_id: str) -> str:
    prefix = prefix.strip("/")
    return f"gs://{bucket}/{prefix + '/' if prefix else ''}{job_path(namespace, job_id)}/"


def chunk_uri(staging_uri: str, index: int) -> str:
    return join(staging_uri, CHUNKS, f"chunk-{index:05d}.parquet")


def manifest_uri(staging_uri: str) -> str:
    return join(staging_uri, MANIFEST)


def delivered_marker_uri(staging_uri: str, dest_index: int, chunk: int) -> str:
    return join(staging_uri, DELIVERED, str(dest_index), str(chunk))


def progress_uri(staging_uri: str, chunk: int) -> str:
    """Written by the transport worker once `chunk` reached every destination of the backfill.
    Only a count: exactly once rests on each destination's own marker, never on this."""
    return join(staging_uri, PROGRESS, str(chunk))


# The progress object's custom metadata key: the chunk's rows, which a bucket listing returns
# with each object's name, so that the operator sums rows_delivered without reading any object.
PROGRESS_ROWS = "rows"


def progress_metadata(rows: int | None) -> dict[str, str] | None:
    """The custom metadata of a chunk's progress object: its rows (none if unknown)."""
    return {PROGRESS_ROWS: str(rows)} if isinstance(rows, int) and rows >= 0 else None


def rows_of_progress(metadata: dict[str, str] | None) -> int | None:
    """The rows a listed progress object's custom metadata names; None if it names none."""
    value = (metadata or {}).get(PROGRESS_ROWS)
    return int(value) if isinstance(value, str) and value.isdigit() and len(value) <= 18 else None


def progress_prefix(staging_uri: str) -> str:
    return join(staging_uri, PROGRESS) + "/"


def chunk_of_progress(name: str) -> int | None:
    """The chunk a progress object's name (or URI) is for; None for anything else."""
    last = name.rstrip("/").rsplit("/", 1)[-1]
    return int(last) if last.isdigit() else None


def deletable_prefix(staging_uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b/"), refusing anything shallower than a job's prefix.

    A misconfigured URI must not wipe a bucket: a job's prefix is [<prefix>/]<namespace>/<job_id>
    (the operator's staging prefix may be empty), so at least two segments below the bucket.
    """
    if not staging_uri.startswith("gs://"):
        raise StagingLayoutError(f"{staging_uri!r} is not a gs:// URI")
    parts = [p for p in staging_uri[len("gs://") :].split("/") if p]
    if len(parts) < 3:
        raise StagingLayoutError(
            f"refusing to delete {staging_uri!r}: expected gs://<bucket>/[<prefix>/]<namespace>/<job_id>/"
        )
    return parts[0], "/".join(parts[1:]) + "/"
