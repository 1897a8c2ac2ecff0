"""API keys: generated once, stored only as a SHA-256 digest in a labelled Kubernetes Secret.

A key reads `bbk_<key_id>_<secret>`. key_id (12 hex characters) names the Secret
`beam-api-key-<key_id>` in the keys namespace, so a lookup is one GET and never a scan; the
secret part (32 random bytes) is what makes the key unguessable. The Secret holds the SHA-256
of the whole key, never the key: a plain hash is enough for 256-bit random tokens (slow hashes
exist to protect low-entropy passwords) and keeps every request cheap. The digest of the
presented key is compared with hmac.compare_digest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes.client import ApiException, CoreV1Api

ORG_LABEL = "beam-backfill.dev/organization"
KIND_LABEL = "beam-backfill.dev/api-key"
SECRET_PREFIX = "beam-api-key-"
KEY_RE = re.compile(r"^bbk_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
ORG_RE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class ApiKey:
    key_id: str
    organization: str


def new_key() -> tuple[str, str]:
    """(key_id, full key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"bbk_{key_id}_{secrets.token_urlsafe(32)}"


def create_key(core: CoreV1Api, namespace: str, organization: str, description: str = "") -> tuple[ApiKey, str]:
    """Store a new key for `organization`; the plain key is returned once and kept nowhere."""
    if not ORG_RE.match(organization) or len(organization) > 63:
        raise ValueError(f"organization {organization!r} must be a namespace name (lowercase letters, digits, '-')")
    key_id, key = new_key()
    core.create_namespaced_secret(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": SECRET_PREFIX + key_id,
                "labels": {ORG_LABEL: organization, KIND_LABEL: "true"},
                "annotations": {
                    "beam-backfill.dev/created-at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                    "beam-backfill.dev/description": description,
                },
            },
            "type": "Opaque",
            "stringData": {"sha256": digest(key)},
        },
    )
    return ApiKey(key_id, organization), key


def revoke_key(core: CoreV1Api, namespace: str, key_id: str) -> bool:
    try:
        core.delete_namespaced_secret(SECRET_PREFIX + key_id, namespace)
        return True
    except ApiException as e:
        if e.status == 404:
            return False
        raise


def list_keys(core: CoreV1Api, namespace: str) -> list[dict[str, str]]:
    items = core.list_namespaced_secret(namespace, label_selector=f"{KIND_LABEL}=true").items
    return sorted(
        (
            {
                "key_id": s.metadata.name.removeprefix(SECRET_PREFIX),
                "organization": (s.metadata.labels or {}).get(ORG_LABEL, ""),
                "created_at": (s.metadata.annotations or {}).get("beam-backfill.dev/created-at", ""),
                "description": (s.metadata.annotations or {}).get("beam-backfill.dev/description", ""),
            }
            for s in items
        ),
        key=lambda k: (k["organization"], k["created_at"], k["key_id"]),
    )


KNOWN_SECONDS = 3600.0


def _bounded_put(cache: dict, key: str, value, now: float, max_entries: int) -> None:
    """cache[key] = value; a full cache first drops its expired entries, then everything.
    Values are an expiry time or a tuple that starts with one."""
    if len(cache) >= max_entries:
        live = {k: v for k, v in cache.items() if (v[0] if isinstance(v, tuple) else v) > now}
        cache.clear()
        if len(live) < max_entries:
            cache.update(live)
    cache[key] = value


class KeyStore:
    """Resolves a presented key to its organization.

    Lookups are cached for `ttl` seconds (hits and misses alike), so a revoked key stops working
    within `ttl` on every replica and a flood of bad keys costs the apiserver at most one GET per
    key id and ttl. Hits and misses are kept apart: made-up key ids fill only the miss cache, so
    they can never push a valid key out (and make it cost a GET again).
    """

    def __init__(self, core: CoreV1Api, namespace: str, *, ttl: float = 5.0, max_entries: int = 10000) -> None:
        self.core = core
        self.namespace = namespace
        self.ttl = ttl
        self.max_entries = max_entries
        self._hits: dict[str, tuple[float, tuple[str, str]]] = {}
        self._misses: dict[str, float] = {}
        # Key ids found valid in the last KNOWN_SECONDS: their lookups skip the failure limit, so
        # a valid key whose cache entry expired is never held back by others' guesses from the
        # same address (all clients behind one ingress share it).
        self._known: dict[str, float] = {}
        self._lock = threading.Lock()

    def authenticate(self, presented: str | None, *, fetch: bool = True) -> ApiKey | None:
        """The key's identity, or None. fetch=False answers from the cache only (no apiserver
        request): what a caller asks before it has checked the failure limit."""
        if not presented:
            return None
        m = KEY_RE.match(presented)
        if not m:
            return None
        key_id = m.group(1)
        stored = self._stored(key_id, fetch)
        if stored is None:
            return None
        want, organization = stored
        if not hmac.compare_digest(digest(presented).encode(), want.encode()):
            return None
        return ApiKey(key_id, organization)

    def known(self, presented: str | None) -> bool:
        """Whether the key's id was found valid recently (not whether this key is valid)."""
        m = KEY_RE.match(presented or "")
        with self._lock:
            return bool(m) and self._known.get(m.group(1), 0.0) > time.monotonic()

    def _stored(self, key_id: str, fetch: bool) -> tuple[str, str] | None:
        now = time.monotonic()
        with self._lock:
            hit = self._hits.get(key_id)
            if hit and hit[0] > now:
                return hit[1]
            if self._misses.get(key_id, 0.0) > now or not fetch:
                return None
        value = self._fetch(key_id)
        with self._lock:
            if value is not None:
                _bounded_put(self._hits, key_id, (now + self.ttl, value), now, self.max_entries)
                _bounded_put(self._known, key_id, now + KNOWN_SECONDS, now, self.max_entries)
            else:
                _bounded_put(self._misses, key_id, now + self.ttl, now, self.max_entries)
        return value

    def _fetch(self, key_id: str) -> tuple[str, str] | None:
        try:
            s = self.core.read_namespaced_secret(SECRET_PREFIX + key_id, self.namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        organization = (s.metadata.labels or {}).get(ORG_LABEL)
        raw = (s.data or {}).get("sha256")
        if not organization or not raw:
            return None
        return base64.b64decode(raw).decode().strip(), organization
