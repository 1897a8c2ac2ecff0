"""One active operator among replicas: a Lease (coordination.k8s.io), as controller-runtime elects.

A replica waits here, standing by, until it holds the Lease; then kopf starts and a thread renews
the Lease every RENEW_S. A replica that cannot renew for LEASE_S (the apiserver unreachable, or
the Lease taken by another) exits at once: two operators must never act together, and the
Deployment restarts it as a standby. On a clean stop (SIGTERM, a rollout) the Lease is released,
so the standby takes over within RETRY_S; after a crash (SIGKILL, a lost node) within LEASE_S +
RETRY_S (docs/operations.md, "A standby operator").

Why not kopf's peering: it needs a CRD of its own, and replicas of equal priority both freeze.
While standing by the replica answers its liveness probe itself, on the port kopf serves later.

Clocks: as client-go does, a standby never compares the Lease's renewTime with its own wall
clock (the nodes' clocks may differ by more than the lease). It notes when it last saw the Lease
change, on its own monotonic clock, and takes it only after lease_duration_seconds without a
change. The leader counts from the moment it sent its last successful renewal. Any error on the
way (a refused connection while the apiserver restarts, a timeout, a 5xx) is a failed attempt,
never the end of the renewal thread or of a standby's wait (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger("beam_operator.leader")

LEASE_S = 15
RENEW_S = 5
RETRY_S = 2


def identity() -> str:
    """The Pod's name (the chart passes it), or the host's: unique among replicas."""
    return os.environ.get("POD_NAME") or os.uname().nodename


def _api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CoordinationV1Api(), client


@contextmanager
def _standby_health(endpoint: str | None):
    """/healthz while standing by, so the kubelet does not restart a healthy standby."""
    if not endpoint:
        yield
        return
    where = urlsplit(endpoint)

    class Health(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == where.path else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer((where.hostname or "0.0.0.0", where.port or 80), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()  # kopf binds the same port next


_held: Lease | None = None


def still_leader() -> bool:
    """False once this replica can no longer be sure it holds the Lease (its last renewal is
    older than the lease minus one renewal period: e.g. the process was frozen). Checked before
    the operator writes anything; True when there is no election (a lone operator)."""
    return _held is None or time.monotonic() - _held.renewed < LEASE_S - RENEW_S


def before_writing() -> None:
    """Exit unless this replica can still be sure it holds the Lease: what the controller checks
    before each reconcile and each finalizer round, since a replica frozen past its lease must
    not write anything."""
    if not still_leader():
        step_down("the lease may be another replica's now")


def step_down(why: str) -> None:
    log.error("%s: exiting so that only one operator acts", why)
    logging.shutdown()
    os._exit(1)


class Lease:
    def __init__(self, namespace: str, name: str, me: str | None = None) -> None:
        self.namespace, self.name, self.me = namespace, name, me or identity()
        self.api, self.client = _api()
        self._stop = threading.Event()
        self.renewed = 0.0  # time.monotonic() when the last successful acquire or renewal was sent
        self._observed: tuple[str, str] | None = None  # another holder's Lease: (holder, resourceVersion)
        self._observed_at = 0.0  # time.monotonic() when this replica first saw _observed

    def acquire(self, liveness_endpoint: str | None = None) -> None:
        """Block until this replica holds the Lease."""
        waited_for = None
        with _standby_health(liveness_endpoint):
            while not self._try_acquire():
                holder = self._holder()
                if holder != waited_for:
                    log.info("standing by: lease %s/%s is held by %s", self.namespace, self.name, holder)
                    waited_for = holder
                time.sleep(RETRY_S)
        log.info("acquired lease %s/%s as %s: this replica is the active operator", self.namespace, self.name, self.me)

    def _holder(self) -> str | None:
        try:
            return self.api.read_namespaced_lease(self.name, self.namespace).spec.holder_identity
        except Exception:
            return None

    def _try_acquire(self) -> bool:
        sent = time.monotonic()  # a renewal counts from when it was sent, not answered
        try:
            won = self._try(sent)
        except Exception as e:  # urllib3's MaxRetryError, a timeout, a 5xx: try again later
            log.warning("cannot reach lease %s/%s: %s", self.namespace, self.name, _short(e))
            return False
        if won:
            self.renewed = sent
        return won

    def _expired(self, spec, version: str, now: float) -> bool:
        """Whether another holder's Lease has gone unchanged for its duration, on this replica's
        own clock since it first saw this version."""
        if not spec.holder_identity:
            return True
        seen = (spec.holder_identity, version)
        if seen != self._observed:
            self._observed, self._observed_at = seen, now
            return False
        return now - self._observed_at > (spec.lease_duration_seconds or LEASE_S)

    def _try(self, now: float) -> bool:
        from kubernetes.client.rest import ApiException

        c = self.client
        stamp = datetime.now(UTC)  # written for people reading the Lease; never compared
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as e:
            if e.status != 404:
                log.warning("cannot read lease %s/%s: %s %s", self.namespace, self.name, e.status, e.reason)
                return False
            body = c.V1Lease(
                metadata=c.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=c.V1LeaseSpec(
                    holder_identity=self.me,
                    lease_duration_seconds=LEASE_S,
                    acquire_time=stamp,
                    renew_time=stamp,
                    lease_transitions=0,
                ),
            )
            try:
                self.api.create_namespaced_lease(self.namespace, body)
                return True
            except ApiException:
                return False  # another replica created it first
        spec = lease.spec
        if spec.holder_identity != self.me and not self._expired(spec, lease.metadata.resource_version, now):
            return False
        if spec.holder_identity != self.me:
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.acquire_time = stamp
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.me, stamp, LEASE_S
        try:  # resourceVersion in the body: a replica that raced us gets 409, not the lease
            self.api.replace_namespaced_lease(self.name, self.namespace, lease)
            return True
        except ApiException:
            return False

    def keep(self) -> None:
        """Renew in a thread; exit the process when leadership cannot be proven any more."""
        global _held
        _held = self
        threading.Thread(target=self._renew, name="lease-renewal", daemon=True).start()

    def _renew(self) -> None:
        while not self._stop.wait(RENEW_S):
            if not still_leader():  # frozen past the lease: another replica may be active now
                step_down(f"lease {self.namespace}/{self.name} not renewed for {time.monotonic() - self.renewed:.0f}s")
            if self._try_acquire():
                continue
            holder = self._holder()
            if holder not in (None, self.me) or not still_leader():
                step_down(f"lost lease {self.namespace}/{self.name} (held by {holder})")

    def release(self) -> None:
        """On a clean stop: let the standby take over now rather than after LEASE_S."""
        self._stop.set()
        try:
            lease = self.api.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.me:
                lease.spec.holder_identity = None
                lease.spec.renew_time = None
                self.api.replace_namespaced_lease(self.name, self.namespace, lease)
                log.info("released lease %s/%s", self.namespace, self.name)
        except Exception as e:  # the standby takes over after LEASE_S anyway
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, e)


def _short(e: Exception) -> str:
    """One line of an exception: urllib3's carry the whole retry history."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
