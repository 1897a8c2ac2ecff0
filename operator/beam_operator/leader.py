"""One active operator among replicas: a Lease (coordination.k8s.io), as controller-runtime elects.

A replica waits here, standing by, until it holds the Lease; then kopf starts and a thread renews
the Lease every RENEW_S, on an event loop of its own so that a busy controller loop never delays
a renewal. The calls go through the operator's one client (kubeclient.KubeApi), an instance
per event loop. A replica that cannot renew for LEASE_S (the apiserver unreachable, or
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

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol
from urllib.parse import quote, urlsplit

log = logging.getLogger("beam_operator.leader")

LEASE_S = 15
RENEW_S = 5
RETRY_S = 2


class LeaseApi(Protocol):
    """What the election needs of kubeclient.KubeApi: a request and a close."""

    async def request(
        self, method: str, path: str, *, body: Any = None, ok: tuple[int, ...] = (), fenced: bool = True
    ) -> tuple[int, Any]: ...

    async def close(self) -> None: ...


def identity() -> str:
    """The Pod's name (the chart passes it), or the host's: unique among replicas."""
    return os.environ.get("POD_NAME") or os.uname().nodename


def _micro_time(t: datetime) -> str:
    """A MicroTime as the API writes it."""
    return t.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


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
    def __init__(self, namespace: str, name: str, new_api: Callable[[], LeaseApi], me: str | None = None) -> None:
        self.namespace, self.name, self.me = namespace, name, me or identity()
        self.collection = f"/apis/coordination.k8s.io/v1/namespaces/{quote(namespace)}/leases"
        self.path = f"{self.collection}/{quote(name)}"
        self._new_api = new_api
        self._stop = threading.Event()
        self.renewed = 0.0  # time.monotonic() when the last successful acquire or renewal was sent
        self._observed: tuple[str, str] | None = None  # another holder's Lease: (holder, resourceVersion)
        self._observed_at = 0.0  # time.monotonic() when this replica first saw _observed

    def acquire(self, liveness_endpoint: str | None = None) -> None:
        """Block until this replica holds the Lease."""
        with _standby_health(liveness_endpoint):
            asyncio.run(self._with_api(self._acquire))
        log.info("acquired lease %s/%s as %s: this replica is the active operator", self.namespace, self.name, self.me)

    async def _with_api(self, step):
        api = self._new_api()
        try:
            return await step(api)
        finally:
            await api.close()

    async def _acquire(self, api: LeaseApi) -> None:
        waited_for = None
        while not await self._try_acquire(api):
            holder = await self._holder(api)
            if holder != waited_for:
                log.info("standing by: lease %s/%s is held by %s", self.namespace, self.name, holder)
                waited_for = holder
            await asyncio.sleep(RETRY_S)

    async def _read(self, api: LeaseApi) -> dict[str, Any] | None:
        status, lease = await api.request("GET", self.path, ok=(404,))
        return None if status == 404 else lease

    async def _holder(self, api: LeaseApi) -> str | None:
        try:
            lease = await self._read(api)
        except Exception:
            return None
        return None if lease is None else (lease.get("spec") or {}).get("holderIdentity")

    async def _try_acquire(self, api: LeaseApi) -> bool:
        sent = time.monotonic()  # a renewal counts from when it was sent, not answered
        try:
            won = await self._try(api, sent)
        except Exception as e:  # a refused connection, a timeout, a 5xx: try again later
            log.warning("cannot reach lease %s/%s: %s", self.namespace, self.name, _short(e))
            return False
        if won:
            self.renewed = sent
        return won

    def _expired(self, spec: dict[str, Any], version: str, now: float) -> bool:
        """Whether another holder's Lease has gone unchanged for its duration, on this replica's
        own clock since it first saw this version."""
        if not spec.get("holderIdentity"):
            return True
        seen = (spec["holderIdentity"], version)
        if seen != self._observed:
            self._observed, self._observed_at = seen, now
            return False
        return now - self._observed_at > (spec.get("leaseDurationSeconds") or LEASE_S)

    async def _try(self, api: LeaseApi, now: float) -> bool:
        stamp = _micro_time(datetime.now(UTC))  # written for people reading the Lease; never compared
        lease = await self._read(api)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {
                    "holderIdentity": self.me,
                    "leaseDurationSeconds": LEASE_S,
                    "acquireTime": stamp,
                    "renewTime": stamp,
                    "leaseTransitions": 0,
                },
            }
            status, _ = await api.request("POST", self.collection, body=body, ok=(409,), fenced=False)
            return status != 409  # 409: another replica created it first
        spec = lease.setdefault("spec", {})
        if spec.get("holderIdentity") != self.me and not self._expired(spec, lease["metadata"]["resourceVersion"], now):
            return False
        if spec.get("holderIdentity") != self.me:
            spec["leaseTransitions"] = (spec.get("leaseTransitions") or 0) + 1
            spec["acquireTime"] = stamp
        spec.update(holderIdentity=self.me, renewTime=stamp, leaseDurationSeconds=LEASE_S)
        # resourceVersion in the body: a replica that raced us gets 409, not the lease.
        status, _ = await api.request("PUT", self.path, body=lease, ok=(409,), fenced=False)
        return status != 409

    def keep(self) -> None:
        """Renew in a thread; exit the process when leadership cannot be proven any more."""
        global _held
        _held = self
        thread = threading.Thread(target=asyncio.run, args=(self._with_api(self._renew),), name="lease-renewal")
        thread.daemon = True
        thread.start()

    async def _renew(self, api: LeaseApi) -> None:
        while not await asyncio.to_thread(self._stop.wait, RENEW_S):
            if not still_leader():  # frozen past the lease: another replica may be active now
                step_down(f"lease {self.namespace}/{self.name} not renewed for {time.monotonic() - self.renewed:.0f}s")
            if await self._try_acquire(api):
                continue
            holder = await self._holder(api)
            if holder not in (None, self.me) or not still_leader():
                step_down(f"lost lease {self.namespace}/{self.name} (held by {holder})")

    def release(self) -> None:
        """On a clean stop: let the standby take over now rather than after LEASE_S."""
        self._stop.set()
        try:
            asyncio.run(self._with_api(self._release))
        except Exception as e:  # the standby takes over after LEASE_S anyway
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, _short(e))

    async def _release(self, api: LeaseApi) -> None:
        lease = await self._read(api)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.me:
            return
        lease["spec"]["holderIdentity"] = None
        lease["spec"]["renewTime"] = None
        await api.request("PUT", self.path, body=lease, fenced=False)
        log.info("released lease %s/%s", self.namespace, self.name)


def _short(e: Exception) -> str:
    """One line of an exception: some carry a whole retry history."""
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
