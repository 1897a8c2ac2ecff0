"""Delivery markers in GCS for the at-least-once sinks (beam_contract.staging).

Written only after the destination acknowledged the chunk's last row, so a marker never
claims more than happened; a crash between the last acknowledgement and the marker resends the
chunk, which receivers deduplicate by idempotency key / message id (docs/message-format.md).
"""

from __future__ import annotations

import json
import time

from beam_contract.staging import delivered_marker_uri
from beam_jobrunner import seal, storage
from beam_jobrunner.sinks import Context


def marker_uri(ctx: Context) -> str:
    return delivered_marker_uri(ctx.staging_uri, ctx.dest_index, ctx.chunk)


def is_delivered(ctx: Context) -> bool:
    uri = marker_uri(ctx)
    if not storage.exists(uri):
        return False
    k = seal.key()
    # With the backfill's key only a marker it signed counts: a marker another organization's
    # Pod wrote must not make a chunk skipped (delivering it again is what a retry does anyway).
    return k is None or seal.verified(storage.read_json(uri), k)


def mark_delivered(ctx: Context, rows: int, nbytes: int) -> None:
    body = {
        "job_id": ctx.job_id,
        "chunk": ctx.chunk,
        "destination": ctx.dest_index,
        "rows": rows,
        "bytes": nbytes,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    k = seal.key()
    storage.write_bytes(marker_uri(ctx), json.dumps(seal.sign(body, k) if k is not None else body).encode())
