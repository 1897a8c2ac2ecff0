"""The benchmark's own eyes: list+watch threads that time when things become visible.

bench/scale.py measures latencies as a client sees them: both ends of each interval are first
sightings in the same kind of watch stream, so the watch delivery delay mostly cancels out and
no clock of another process is involved. The streams survive an apiserver restart (reconnect,
relist on 410 Gone), which is also what they need for the resilience runs.
"""

from __future__ import annotations

import http.client
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

JOB_SELECTOR = "beam-backfill.dev/job-id"
_FINISHED = ("Complete", "SuccessCriteriaMet", "Failed", "FailureTarget")


def admin_ssl(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


class Client:
    """A keep-alive HTTPS connection to the apiserver as the admin; JSON in and out."""

    def __init__(self, port: int, ctx: ssl.SSLContext, timeout: float = 30, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port, self.ctx, self.timeout = port, ctx, timeout
        self.conn: http.client.HTTPSConnection | None = None

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> tuple[int, Any]:
        for attempt in (1, 2):
            if self.conn is None:
                self.conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=self.timeout)
            try:
                data = orjson.dumps(body) if body is not None else None
                self.conn.request(
                    method, path, body=data, headers={"Content-Type": content_type, "Accept": "application/json"}
                )
                resp = self.conn.getresponse()
                raw = resp.read()
                return resp.status, (orjson.loads(raw) if raw else None)
            except (OSError, http.client.HTTPException):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


@dataclass
class JobSeen:
    namespace: str
    name: str
    backfill: str
    kind: str  # staging or transport (the Job's label beam-backfill.dev/phase)
    uids: set[str] = field(default_factory=set)
    created: float = 0.0  # first sighting
    finished: float = 0.0  # first sighting with a finished condition


@dataclass
class BackfillSeen:
    uid: str = ""
    status_at: dict[str, float] = field(default_factory=dict)  # status -> first sighting
    status: str = ""
    chunks_left: int | None = None
    deleted: float = 0.0  # when its DELETED event came (--ttl: the operator expired it)


class Watcher:
    """One list+watch loop per resource in a thread; keeps first-sighting times."""

    def __init__(self, port: int, ctx: ssl.SSLContext, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port, self.ctx = port, ctx
        self.jobs: dict[tuple[str, str], JobSeen] = {}
        self.backfills: dict[tuple[str, str], BackfillSeen] = {}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.ready = threading.Event()  # both streams have listed once
        self._listed: set[str] = set()
        self.reconnects = {"jobs": 0, "beambackfills": 0}
        self.threads = [
            threading.Thread(
                target=self._loop,
                args=("jobs", "/apis/batch/v1/jobs", {"labelSelector": JOB_SELECTOR}, self._on_job),
                daemon=True,
            ),
            threading.Thread(
                target=self._loop,
                args=("beambackfills", "/apis/beam-backfill.dev/v1alpha1/beambackfills", {}, self._on_backfill),
                daemon=True,
            ),
        ]

    def start(self) -> Watcher:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopping.set()

    # --- what the events mean ----------------------------------------------------------

    def _on_job(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        key = (meta["namespace"], meta["name"])
        with self.lock:
            seen = self.jobs.get(key)
            if seen is None:
                seen = self.jobs[key] = JobSeen(
                    meta["namespace"],
                    meta["name"],
                    labels.get("beam-backfill.dev/backfill", ""),
                    labels.get("beam-backfill.dev/phase", ""),
                    created=now,
                )
            seen.uids.add(meta["uid"])
            conds = (obj.get("status") or {}).get("conditions") or []
            if not seen.finished and any(c.get("type") in _FINISHED and c.get("status") == "True" for c in conds):
                seen.finished = now

    def _on_backfill(self, kind: str, obj: dict[str, Any], now: float) -> None:
        meta = obj["metadata"]
        key = (meta["namespace"], meta["name"])
        st = obj.get("status") or {}
        with self.lock:
            seen = self.backfills.setdefault(key, BackfillSeen(uid=meta["uid"]))
            if kind == "DELETED":
                seen.deleted = seen.deleted or now
                return
            s = st.get("status") or ""
            seen.status = s
            seen.chunks_left = st.get("chunks_left")
            if s and s not in seen.status_at:
                seen.status_at[s] = now

    # --- list + watch --------------------------------------------------------------------

    def _loop(self, name: str, path: str, params: dict[str, str], handle: Callable[[str, dict, float], None]) -> None:
        rv = ""
        while not self.stopping.is_set():
            try:
                if not rv:
                    client = Client(self.port, self.ctx, host=self.host)
                    try:
                        code, body = client.request("GET", f"{path}?{urllib.parse.urlencode(params)}")
                    finally:
                        client.close()
                    if code != 200:
                        raise OSError(f"list {path}: HTTP {code}")
                    now = time.time()
                    for item in body["items"]:
                        handle("ADDED", item, now)
                    rv = body["metadata"]["resourceVersion"]
                    self._listed.add(name)
                    if len(self._listed) == len(self.threads):
                        self.ready.set()
                rv = self._watch(path, params, rv, handle)
            except (OSError, http.client.HTTPException, ValueError):
                if self.stopping.is_set():
                    return
                self.reconnects[name] += 1
                time.sleep(0.5)

    def _watch(self, path: str, params: dict[str, str], rv: str, handle) -> str:
        q = urllib.parse.urlencode(
            {**params, "watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": "60"}
        )
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.ctx, timeout=90)
        try:
            conn.request("GET", f"{path}?{q}")
            resp = conn.getresponse()
            if resp.status != 200:
                resp.read()
                return "" if resp.status == 410 else rv
            while not self.stopping.is_set():
                line = resp.readline()
                if not line:
                    return rv
                ev = orjson.loads(line)
                obj = ev["object"]
                if ev["type"] == "ERROR":
                    return "" if obj.get("code") == 410 else rv
                rv = obj["metadata"].get("resourceVersion") or rv
                if ev["type"] != "BOOKMARK":
                    handle(ev["type"], obj, time.time())
            return rv
        finally:
            conn.close()
