"""The handful of Kubernetes API calls the controller makes, as coroutines on one aiohttp session.

Why not the `kubernetes` client: its calls block, so the controller ran them in a thread pool
(two threads per worker), and at scale those threads fought the event loop for the GIL:
kopf's own watch handling lagged, and more workers made a burst of new backfills slower, not
faster (docs/benchmarks.md, "The controller's API calls on asyncio"). Here every call is a
coroutine on the event loop kopf already runs, and JSON stays plain dicts (no model objects).
kubernetes_asyncio, the same design as a library, was measured against this module and costs
more CPU and memory for the same requests (docs/benchmarks.md, "One Kubernetes client"). This is
the operator's one client: the leader Lease's requests go through it too.

Decisions (docs/operations.md):
- one ClientSession with a bounded connector (`connections`): the bound, not a thread count,
  is what limits the requests in flight; a request beyond it waits for a free connection;
- credentials from `kopf.login_via_client` (kubeconfig or in-cluster service account), as
  kopf's own session gets them; a 401 logs in again once and repeats the request, since
  service-account tokens rotate under a running operator;
- a total timeout per request (`timeout`, 30 s like kopf's settings.networking.request_timeout);
- one retry when the server dropped a kept-alive connection before answering (a restarted
  kube-apiserver leaves such sockets in the pool); every call here is safe to repeat: a
  repeated create is a 409 (found existing), a repeated delete a 404, a status merge patch
  idempotent, and an Event is only for people.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp
import kopf
import orjson

from beam_contract.model import GROUP, KIND, PLURAL, VERSION

from . import child_jobs, leader, metrics
from .config import OperatorConfig
from .observe import JobObs, PodObs, WaitingPod, owner_job_name, pod_may_write, waiting_of
from .runtime.events import MAX_EVENT_MESSAGE, Event

log = logging.getLogger("beam_operator.kubeclient")

Login = Callable[[], "kopf.ConnectionInfo | None"]


class ApiError(RuntimeError):
    """A status the caller does not expect; the message names the request and says the API's why."""

    def __init__(self, method: str, path: str, status: int, reason: str, message: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.api_message = message


def login_via_client(settings: kopf.OperatorSettings | None = None) -> Login:
    """kopf's login through the kubernetes client's config loaders (in-cluster, else kubeconfig)."""

    def login() -> kopf.ConnectionInfo | None:
        return kopf.login_via_client(logger=log, settings=settings or kopf.OperatorSettings())

    return login


def http_session(info: kopf.ConnectionInfo, connections: int, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session to the API server of `info` (its TLS material and proxy), with at most
    `connections` connections: kopf's own session (handlers.login) and the controller's."""
    connector = aiohttp.TCPConnector(limit=connections, ssl=info.as_ssl_context())
    return aiohttp.ClientSession(connector=connector, proxy=info.proxy_url, trust_env=info.trust_env, **kwargs)


def _api_message(raw: bytes) -> str:
    try:
        doc = orjson.loads(raw)
        if isinstance(doc, dict) and doc.get("message"):
            return str(doc["message"])
    except orjson.JSONDecodeError:
        pass
    return raw[:300].decode(errors="replace") or "(empty body)"


def _tls_material(info: kopf.ConnectionInfo) -> tuple:
    return (
        info.server,
        info.ca_path,
        info.ca_data,
        info.insecure,
        info.certificate_path,
        info.certificate_data,
        info.private_key_path,
        info.private_key_data,
        info.proxy_url,
        info.trust_env,
    )


class KubeApi:
    """The controller's API calls. Create inside the event loop; close() when done."""

    def __init__(
        self,
        config: OperatorConfig,
        identity: str = "beam-backfill-operator",
        *,
        login: Login | None = None,
        connections: int = 36,
        timeout: float = 30.0,
    ) -> None:
        self.config = config
        self.identity = identity
        self._login_fn = login or login_via_client()
        self.connections = connections
        self.timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None
        self._headers: dict[str, str] = {}
        self._generation = 0  # bumped by each login, so that concurrent 401s log in once
        self._login_lock = asyncio.Lock()
        self._retired: set[asyncio.Task] = set()

    # --- the session ----------------------------------------------------------------------

    async def _ensure(self) -> int:
        if self._session is None:
            async with self._login_lock:
                if self._session is None:
                    await self._relogin()
        return self._generation

    async def _relogin(self) -> None:
        info = self._login_fn()
        if info is None:
            raise kopf.LoginError("no credentials for the Kubernetes API (neither in-cluster nor kubeconfig)")
        if self._session is None or self._info is None or _tls_material(info) != _tls_material(self._info):
            old = self._session
            self._session = http_session(info, self.connections, timeout=self.timeout)
            if old is not None:
                # Requests may still be in flight on it: close it once they must have ended.
                task = asyncio.create_task(self._close_later(old))
                self._retired.add(task)
                task.add_done_callback(self._retired.discard)
        # Per request rather than on the session: a rotated token alone needs no new connections.
        # The User-Agent names us in the apiserver's audit log and in API priority and fairness.
        self._headers = {
            **info.as_http_headers(),
            "Content-Type": "application/json",
            "Accept": "application/json",
            "User-Agent": self.identity,
        }
        self._info = info
        self._generation += 1

    async def _close_later(self, session: aiohttp.ClientSession) -> None:
        try:
            await asyncio.sleep(self.timeout.total or 30)
        finally:
            await session.close()

    async def close(self) -> None:
        for task in list(self._retired):
            task.cancel()
        await asyncio.gather(*self._retired, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Any = None,
        content_type: str | None = None,
        ok: tuple[int, ...] = (),
        fenced: bool = True,
    ) -> tuple[int, Any]:
        """One call; returns (status, parsed JSON body). Statuses below 300 or listed in `ok`
        are answers, any other raises ApiError. Writes are `fenced` by the leader Lease, except
        the election's own."""
        if fenced and method != "GET":
            # Each write may follow an await of any length (a slow read, a full loop): the lease
            # is checked again here, not only when the reconcile began.
            leader.before_writing()
        data = None if body is None else orjson.dumps(body)
        relogged = retried = False
        while True:
            generation = await self._ensure()
            assert self._session is not None and self._info is not None
            headers = self._headers if content_type is None else {**self._headers, "Content-Type": content_type}
            try:
                async with self._session.request(
                    method, self._info.server + path, params=params, data=data, headers=headers
                ) as resp:
                    raw = await resp.read()
                    status, reason = resp.status, resp.reason or ""
            except aiohttp.ServerDisconnectedError:
                if retried:
                    raise
                retried = True
                continue
            if status == 401 and not relogged:
                relogged = True
                async with self._login_lock:
                    if self._generation == generation:  # nobody logged in again since we sent
                        log.info("the API server refused our credentials (401): logging in again")
                        await self._relogin()
                continue
            if status < 300 or status in ok:
                return status, (orjson.loads(raw) if raw else None)
            raise ApiError(method, path, status, reason, _api_message(raw))

    # --- the calls ------------------------------------------------------------------------

    async def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """True if created, False if a Job of that name exists: the deterministic name did its job."""
        metrics.API_WRITES.labels(kind="create_job").inc()
        status, _ = await self.request("POST", f"/apis/batch/v1/namespaces/{namespace}/jobs", body=manifest, ok=(409,))
        return status != 409

    async def create_config_map(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """True if created, False if it exists (immutable, and named for its backfill: the same)."""
        metrics.API_WRITES.labels(kind="create_config_map").inc()
        status, _ = await self.request("POST", f"/api/v1/namespaces/{namespace}/configmaps", body=manifest, ok=(409,))
        return status != 409

    async def create_secret(self, namespace: str, manifest: dict[str, Any]) -> bool:
        """True if created, False if it exists (immutable: the first key stays the backfill's)."""
        metrics.API_WRITES.labels(kind="create_secret").inc()
        status, _ = await self.request("POST", f"/api/v1/namespaces/{namespace}/secrets", body=manifest, ok=(409,))
        return status != 409

    async def delete_backfill(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None:
        """A backfill whose ttl_seconds_after_finished has passed. Returns the object as the
        deletion left it (its finalizer holds it, now with a deletionTimestamp), None if it is
        gone already (404) or is another backfill of the same name (409: the uid precondition)."""
        metrics.API_WRITES.labels(kind="delete_backfill").inc()
        status, doc = await self.request(
            "DELETE",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{quote(name)}",
            body={"kind": "DeleteOptions", "apiVersion": "v1", "preconditions": {"uid": uid}},
            ok=(404, 409),
        )
        if status >= 300 or not isinstance(doc, dict) or doc.get("kind") != KIND:
            return None
        return doc

    async def add_finalizer(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str | None
    ) -> dict[str, Any] | None:
        """Sets the backfill's finalizers to `finalizers` (ours added) if it is still at
        `resource_version`: a merge patch replaces the whole list, so the version guards the
        finalizers another controller may have added since. The patched object; None if the
        apiserver has a newer version (409) or the backfill is gone (404)."""
        metrics.API_WRITES.labels(kind="add_finalizer").inc()
        status, doc = await self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{quote(name)}",
            body={"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}},
            content_type="application/merge-patch+json",
            ok=(404, 409),
        )
        return doc if status < 300 else None

    async def remove_finalizer(
        self, namespace: str, name: str, uid: str, finalizers: list[str], finalizer: str
    ) -> bool:
        """Removes `finalizer` from the backfill of that uid, found at its place in `finalizers`
        (the list as last seen). A JSON patch that tests both first, so it cannot remove another
        one or touch a newer backfill of the same name, whatever else changed. True once removed
        or gone (404); False if the list is not what was seen (422: the tests failed)."""
        if finalizer not in finalizers:
            return True
        at = f"/metadata/finalizers/{finalizers.index(finalizer)}"
        metrics.API_WRITES.labels(kind="remove_finalizer").inc()
        status, _ = await self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{quote(name)}",
            body=[
                {"op": "test", "path": "/metadata/uid", "value": uid},
                {"op": "test", "path": at, "value": finalizer},
                {"op": "remove", "path": at},
            ],
            content_type="application/json-patch+json",
            ok=(404, 422),
        )
        return status != 422

    async def suspend_job(self, namespace: str, name: str, suspend: bool) -> None:
        """spec.suspend of a Job (merge patch); 404: gone, nothing to pause or resume."""
        metrics.API_WRITES.labels(kind="suspend_job").inc()
        await self.request(
            "PATCH",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}",
            body={"spec": {"suspend": suspend}},
            content_type="application/merge-patch+json",
            ok=(404,),
        )

    async def delete_job(self, namespace: str, name: str) -> None:
        metrics.API_WRITES.labels(kind="delete_job").inc()
        # Foreground: the Job disappears only after its Pods, so "no Jobs left" also means no
        # worker still sending. 404: gone already.
        await self.request(
            "DELETE",
            f"/apis/batch/v1/namespaces/{namespace}/jobs/{quote(name)}",
            body={"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Foreground"},
            ok=(404,),
        )

    async def get_backfill(self, namespace: str, name: str) -> dict[str, Any] | None:
        """One BeamBackfill as stored (None if gone): its whole spec, which the cache slims."""
        status, body = await self.request(
            "GET", f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{quote(name)}", ok=(404,)
        )
        return None if status == 404 else body

    async def live_children(self, namespace: str, uid: str) -> tuple[list[JobObs], int]:
        """A backfill's Jobs and how many Pods it still has, read from the apiserver, not a cache:
        what decides whether its staged files may be deleted (docs/security.md)."""
        selector = {"labelSelector": f"{child_jobs.LABEL_JOB_ID}={uid}"}
        (_, jobs), (_, pods) = await asyncio.gather(
            self.request("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs", params=selector),
            self.request("GET", f"/api/v1/namespaces/{namespace}/pods", params=selector),
        )
        owned = [j for j in jobs["items"] if child_jobs.owner_uid(j) == uid]
        now = datetime.now(UTC)
        return [JobObs.from_job(j) for j in owned], sum(1 for p in pods["items"] if pod_may_write(p, now))

    async def finished_pods(self, namespace: str, job_name: str) -> dict[str, PodObs]:
        """The finished Pods of one Job, by name: what their workers said."""
        _, doc = await self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params={
                "labelSelector": f"batch.kubernetes.io/job-name={job_name}",
                "fieldSelector": "status.phase!=Pending,status.phase!=Running",
            },
        )
        found = {}
        for pod in doc["items"]:
            if owner_job_name(pod) != job_name:
                continue  # its label says this Job, its owner does not: not what the worker said
            obs = PodObs.from_pod(pod)
            if obs is not None:
                found[pod["metadata"]["name"]] = obs
        return found

    async def pending_pods(self, namespace: str) -> dict[str, list[WaitingPod]]:
        """Every Pending worker Pod of a namespace that waits for a reason that will not pass by
        itself, by Job name: one list serves every backfill of the namespace (observe.Observer)."""
        _, doc = await self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/pods",
            params={"labelSelector": child_jobs.LABEL_JOB_ID, "fieldSelector": "status.phase=Pending"},
        )
        found: dict[str, list[WaitingPod]] = {}
        for pod in doc["items"]:
            job = (pod.get("metadata", {}).get("labels") or {}).get("batch.kubernetes.io/job-name", "")
            if job and (w := waiting_of(job, pod)) is not None:
                found.setdefault(job, []).append(w)
        return found

    async def failed_create(self, namespace: str, job: JobObs) -> list[WaitingPod]:
        """For a Job with no Pod at all, the cluster's refusal to create them (its latest
        FailedCreate Event)."""
        _, events = await self.request(
            "GET",
            f"/api/v1/namespaces/{namespace}/events",
            params={"fieldSelector": f"involvedObject.kind=Job,involvedObject.name={job.name},reason=FailedCreate"},
        )
        latest = max(events["items"], key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "", default=None)
        if latest is None:
            return []
        return [WaitingPod(job.name, "", "FailedCreate", latest.get("message") or "", job.created_at)]

    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """The backfill as stored after the patch, or None if it was deleted meanwhile."""
        code, doc = await self.request(
            "PATCH",
            f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PLURAL}/{quote(name)}/status",
            body={"status": status},
            content_type="application/merge-patch+json",
            ok=(404,),
        )
        return None if code == 404 else doc

    async def post_event(self, body: dict[str, Any], ev: Event) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        metrics.API_WRITES.labels(kind="event").inc()
        try:
            await self.request(
                "POST",
                f"/api/v1/namespaces/{meta['namespace']}/events",
                body={
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {"generateName": f"{meta['name']}."},
                    "involvedObject": {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": KIND,
                        "name": meta["name"],
                        "namespace": meta["namespace"],
                        "uid": meta["uid"],
                    },
                    "reason": ev.reason,
                    "message": ev.message[:MAX_EVENT_MESSAGE],
                    "type": ev.type,
                    "firstTimestamp": now,
                    "lastTimestamp": now,
                    "count": 1,
                    "source": {"component": self.identity},
                    "reportingComponent": self.identity,
                },
            )
        except (TimeoutError, ApiError, aiohttp.ClientError) as e:
            log.warning("could not record event %s on %s/%s: %s", ev.reason, meta["namespace"], meta["name"], e)
