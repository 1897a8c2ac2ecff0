"""gs:// objects through pyarrow's GCS filesystem: chunks, the manifest, delivery markers.

Where each of them lives under a job's staging URI is beam_contract.staging.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from functools import cache
from urllib.parse import urlparse

import pyarrow.fs as pafs

from beam_contract.worker import DEFAULT_CONNECT_TIMEOUT_S, Env
from beam_jobrunner.errors import PermanentError, TransientError


@cache
def filesystem(timeout: float | None = None) -> pafs.GcsFileSystem:
    emulator = os.environ.get(Env.STORAGE_EMULATOR_HOST)
    limit = timeout or float(os.environ.get(Env.CONNECT_TIMEOUT_S, DEFAULT_CONNECT_TIMEOUT_S))
    kw = {"retry_time_limit": timedelta(seconds=limit)}
    if emulator:
        u = urlparse(emulator if "://" in emulator else f"http://{emulator}")
        return pafs.GcsFileSystem(anonymous=True, endpoint_override=u.netloc, scheme=u.scheme or "http", **kw)
    return pafs.GcsFileSystem(**kw)


def path_of(uri: str) -> str:
    """gs://bucket/a/b -> bucket/a/b (pyarrow's path form)."""
    if not uri.startswith("gs://"):
        raise PermanentError(f"storage: {uri!r} is not a gs:// URI")
    return uri[len("gs://") :]


def write_bytes(uri: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write an object; `metadata` becomes its custom metadata (GCS returns it in listings)."""
    try:
        with filesystem().open_output_stream(path_of(uri), metadata=metadata) as out:
            out.write(data)
    except OSError as e:
        raise TransientError(f"storage: cannot write {uri}: {e}") from None


def read_bytes(uri: str) -> bytes:
    try:
        with filesystem().open_input_stream(path_of(uri)) as f:
            return f.read()
    except FileNotFoundError:
        raise PermanentError(f"storage: {uri} does not exist") from None
    except OSError as e:
        raise TransientError(f"storage: cannot read {uri}: {e}") from None


def exists(uri: str) -> bool:
    info = filesystem().get_file_info(path_of(uri))
    return info.type != pafs.FileType.NotFound


def list_files(prefix_uri: str) -> list[tuple[str, int]]:
    """(gs:// URI, size) of every object under prefix_uri, sorted by name."""
    sel = pafs.FileSelector(path_of(prefix_uri).rstrip("/"), recursive=True, allow_not_found=True)
    infos = [i for i in filesystem().get_file_info(sel) if i.type == pafs.FileType.File]
    return sorted((f"gs://{i.path}", i.size) for i in infos)


def write_json(uri: str, obj, metadata: dict[str, str] | None = None) -> None:
    write_bytes(uri, json.dumps(obj, indent=1, sort_keys=False).encode() + b"\n", metadata)


def read_json(uri: str):
    return json.loads(read_bytes(uri))
