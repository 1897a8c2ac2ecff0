"""Staged data sealed per backfill: what keeps one organization's staged rows and markers from
another's Pods, which share the staging bucket and the workers' cloud identity (issue 25).

The operator gives each backfill a random 256-bit key in a Secret of the backfill's own
namespace (`<name>-<uid8>-staging-key`, owned by the backfill); only that backfill's workers
get it (env BEAM_STAGING_KEY through secretKeyRef). With it:
- each staged chunk is AES-256-GCM encrypted, its path inside the backfill's prefix as the
  associated data, so a Pod of another organization reads only ciphertext, and a chunk
  replaced or moved by anyone without the key fails the transport worker instead of being
  delivered;
- the manifest and the delivery markers carry an HMAC-SHA256 (`mac`): a forged manifest (fewer
  chunks) fails, and a forged marker is not believed (the chunk is delivered again, which the
  at-least-once sinks' idempotency keys absorb).
Without the key (a worker run by hand, the benchmarks) nothing is sealed; the operator always
sets it. Progress objects are not sealed: the operator, which has no key, reads them only to
count chunks_left. Chunks that Snowflake unloads itself (stage strategy `unload`) are written
by Snowflake, not sealed: there the bucket's IAM is the boundary (docs/security.md).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from typing import Any

from beam_contract.worker import Env
from beam_jobrunner.errors import PermanentError

MAGIC = b"BEAMSEAL1"
NONCE_BYTES = 12


def key() -> bytes | None:
    raw = os.environ.get(Env.STAGING_KEY)
    if not raw:
        return None
    try:
        k = base64.b64decode(raw, validate=True)
    except ValueError:
        k = b""
    if len(k) != 32:
        raise PermanentError(f"configuration: {Env.STAGING_KEY} is not 32 bytes of base64")
    return k


def seal(data: bytes, where: str, k: bytes) -> bytes:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(NONCE_BYTES)
    return MAGIC + nonce + AESGCM(k).encrypt(nonce, data, where.encode())


def unseal(data: bytes, where: str, k: bytes) -> bytes:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    head = len(MAGIC) + NONCE_BYTES
    if not data.startswith(MAGIC) or len(data) < head + 16:
        raise _foreign(where)
    try:
        return AESGCM(k).decrypt(data[len(MAGIC) : head], data[head:], where.encode())
    except InvalidTag:
        raise _foreign(where) from None


def sign(obj: dict[str, Any], k: bytes) -> dict[str, Any]:
    """`obj` with its `mac`: HMAC-SHA256 of its canonical JSON without the mac."""
    return {**obj, "mac": _mac(obj, k)}


def verified(obj: dict[str, Any], k: bytes) -> bool:
    want = obj.get("mac")
    return isinstance(want, str) and hmac.compare_digest(want, _mac(obj, k))


def _mac(obj: dict[str, Any], k: bytes) -> str:
    body = {key_: v for key_, v in obj.items() if key_ != "mac"}
    return hmac.new(k, json.dumps(body, sort_keys=True, separators=(",", ":")).encode(), hashlib.sha256).hexdigest()


def _foreign(where: str) -> PermanentError:
    return PermanentError(
        f"storage: staged {where} was not written by this backfill's staging worker (replaced or changed by someone "
        'without its key); retry the backfill to stage it again (docs/security.md, "Staged data")'
    )
