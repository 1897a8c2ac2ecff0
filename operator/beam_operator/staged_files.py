"""Delete a backfill's staged chunks from GCS (after success, or when the resource is deleted)."""

from __future__ import annotations

import os
from urllib.parse import urlparse


def split_uri(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if u.scheme != "gs" or not u.netloc:
        raise ValueError(f"not a gs:// URI: {uri}")
    return u.netloc, u.path.lstrip("/")


def delete_staged(uri: str, endpoint: str | None = None) -> int:
    """Delete every object under the gs:// prefix; returns how many. Missing bucket counts as 0."""
    from google.api_core.exceptions import NotFound
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    bucket, prefix = split_uri(uri)
    if not prefix.endswith("/"):
        prefix += "/"  # never delete a sibling backfill whose uid shares a prefix
    endpoint = endpoint or os.environ.get("STORAGE_EMULATOR_HOST")
    if endpoint:
        client = storage.Client(project="beam-backfill", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint})
    else:
        client = storage.Client()
    n = 0
    try:
        blobs = list(client.list_blobs(bucket, prefix=prefix))
    except NotFound:
        return 0
    for blob in blobs:
        try:
            blob.delete()
            n += 1
        except NotFound:
            pass
    return n
