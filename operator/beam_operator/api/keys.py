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
import logging
import re
import secrets
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes.client import ApiException, CoreV1Api

log = logging.getLogger("beam_operator.api.keys")

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

    The API lists and watches the key Secrets of its namespace (by label), so the set of valid
    key ids is always known in memory: a lookup costs the apiserver nothing, a revoked key stops
    working as soon as the watch delivers its deletion, and a valid key is recognised before
    any failure limit is consulted, on every replica and right after a restart, whatever others
    sent from the same address (docs/security.md, "API keys"). Until the first list has
    arrived (start-up) a key is looked up with one GET, cached for `ttl` seconds (hits and
    misses apart, so made-up key ids can never push a valid key out).
    """

    def __init__(self, core: CoreV1Api, namespace: str, *, ttl: float = 5.0, max_entries: int = 10000) -> None:
        self.core = core
        self.namespace = namespace
        self.ttl = ttl
        self.max_entries = max_entries
        self._hits: dict[str, tuple[float, tuple[str, str]]] = {}
        self._misses: dict[str, float] = {}
        # key id -> (digest, organization) of every key Secret, from the list + watch.
        self._watched: dict[str, tuple[str, str]] = {}
        self._synced = threading.Event()
        self._lock = threading.Lock()

    def watch(self) -> threading.Thread:
        """Keep the key ids in memory from a list + watch of the key Secrets, in a thread."""
        thread = threading.Thread(target=self._watch_forever, name="api-key-watch", daemon=True)
        thread.start()
        return thread

    def wait_synced(self, timeout: float) -> bool:
        return self._synced.wait(timeout)

    def _watch_forever(self) -> None:
        from kubernetes import watch

        selector = f"{KIND_LABEL}=true"
        while True:
            try:
                listed = self.core.list_namespaced_secret(self.namespace, label_selector=selector)
                fresh = {k: v for s in listed.items if (k := _key_id(s)) and (v := _stored_of(s))}
                with self._lock:
                    self._watched = fresh
                self._synced.set()
                log.info("API keys: %d known from the keys namespace %s", len(fresh), self.namespace)
                stream = watch.Watch().stream(
                    self.core.list_namespaced_secret,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                )
                for event in stream:
                    obj, kind = event["object"], event["type"]
                    key_id = _key_id(obj)
                    if kind == "ERROR" or not key_id:
                        break  # 410 Gone and the like: list again
                    with self._lock:
                        value = _stored_of(obj)
                        if kind == "DELETED" or value is None:
                            self._watched.pop(key_id, None)
                            self._hits.pop(key_id, None)
                        else:
                            self._watched[key_id] = value
            except Exception as e:  # the apiserver away: the last known keys still serve
                log.warning("API keys: watch interrupted (%s); listing again in 1s", type(e).__name__)
                time.sleep(1.0)

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

    def identity(self, key_id: str) -> tuple[str, str] | None:
        """(fingerprint, organization) of a stored key, None once it is revoked: what a console
        session (which names a key, never holds it) is checked against on every request."""
        stored = self._stored(key_id, fetch=True)
        if stored is None:
            return None
        return hashlib.sha256(stored[0].encode()).hexdigest()[:16], stored[1]

    def known(self, presented: str | None) -> bool:
        """Whether the key's id is one of a stored key (not whether this key is valid)."""
        m = KEY_RE.match(presented or "")
        with self._lock:
            return bool(m) and self._synced.is_set() and m.group(1) in self._watched

    def _stored(self, key_id: str, fetch: bool) -> tuple[str, str] | None:
        now = time.monotonic()
        with self._lock:
            if self._synced.is_set():
                return self._watched.get(key_id)
            hit = self._hits.get(key_id)
            if hit and hit[0] > now:
                return hit[1]
            if self._misses.get(key_id, 0.0) > now or not fetch:
                return None
        value = self._fetch(key_id)
        with self._lock:
            if value is not None:
                _bounded_put(self._hits, key_id, (now + self.ttl, value), now, self.max_entries)
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
        return _stored_of(s)


def _key_id(secret) -> str | None:
    name = secret.metadata.name if secret is not None and secret.metadata is not None else ""
    return name.removeprefix(SECRET_PREFIX) if name and name.startswith(SECRET_PREFIX) else None


def _stored_of(secret) -> tuple[str, str] | None:
    """(digest, organization) of a key Secret, or None if it is not a complete one."""
    organization = (secret.metadata.labels or {}).get(ORG_LABEL)
    raw = (secret.data or {}).get("sha256")
    if not organization or not raw:
        return None
    return base64.b64decode(raw).decode().strip(), organization
