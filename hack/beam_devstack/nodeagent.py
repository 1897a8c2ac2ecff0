"""A node agent that plays the kubelet for one Node, running each Pod as a host process.

The local control plane (beam_devstack.k8s) has no nodes and no container runtime. This agent
registers one Ready Node, binds every unscheduled Pod of the default scheduler to it, and runs
the first container of each Pod bound to it as a plain process on this machine. It writes Pod
status back the way a kubelet does, so that the Job controller, the garbage collector and the
operator see real Pods that start, finish, fail and get deleted.

    python -m beam_devstack.nodeagent --kubeconfig K --node-name local-node --log-dir D

Every Pod whose schedulerName is `default-scheduler` and that has no nodeName is bound to this
node, whatever its nodeSelector, affinity or tolerations (there is one node). A Pod that must stay
Pending (a test of the unscheduled state) names another schedulerName. The node lifecycle is a
kubelet's: a Lease in kube-node-lease renewed every 10 s, a Ready condition refreshed every 60 s.
There is no kubelet API: `kubectl logs/exec` do not work; read `pod_log_path()` instead.

One asyncio loop does everything: one watch on Pods (list, then watch from its resourceVersion,
relist on 410 Gone), a Lease renewal in kube-node-lease every 10 s, and a subprocess per
running Pod whose exit is noticed through a pidfd. No thread per Pod.

Images
------
Images map to local commands through `IMAGES` below, matched on the repository name (tag and
digest dropped, `docker.io/` and `library/` dropped): an exact key first, else the longest key
ending in `/` that prefixes it. Each entry gives the image's ENTRYPOINT and CMD, and whether the
project's virtualenv (the directory of the agent's `sys.executable`, i.e. `.venv/bin`) goes first
on PATH so that `beam-jobrunner`, `beam-operator` and `python` resolve to the project's
environment; in such images `python`/`python3` as the command's first word is sys.executable.

| image (repository)         | ENTRYPOINT          | CMD         | .venv/bin first on PATH |
|----------------------------|---------------------|-------------|-------------------------|
| `beam-backfill/jobrunner`  | `beam-jobrunner`    |             | yes                     |
| `beam-backfill/operator`   | `beam-operator`     |             | yes                     |
| `beam-backfill/*` (other)  |                     |             | yes                     |
| `python`                   |                     | `python3`   | yes                     |
| `busybox`, `alpine`        |                     | `sh`        | no (host tools)         |

Command and args follow Kubernetes: `command` replaces ENTRYPOINT, `args` replaces CMD, and
`$(VAR)` expands from the container's environment (`$$` is a literal `$`; unknown references
stay as written). Extra or replacement entries come from `--images FILE` or the environment
variable `BEAM_NODE_AGENT_IMAGES` (a JSON object, inline or a file path), in the form
`{"repo-or-prefix/": {"entrypoint": [...], "cmd": [...], "venv": true, "env": {...}}}`.
An image that matches nothing leaves its Pod Pending with the container Waiting, reason
`ErrImagePull`, and a message naming the image, as a kubelet does for an image it cannot pull.

Containers
----------
- Only the first container runs; init containers, volumes, probes and resources are ignored.
- Environment: the image's PATH (and `env`), HOME, HOSTNAME (the Pod name), then `envFrom` and
  `env` in order: `value`, `valueFrom.secretKeyRef`, `configMapKeyRef`, `fieldRef`
  (metadata.name/namespace/uid, metadata.labels['k'], metadata.annotations['k'], spec.nodeName,
  spec.serviceAccountName, status.podIP, status.hostIP) and `resourceFieldRef` (the container's
  own request/limit as written, else the node's capacity). A missing Secret, ConfigMap or key
  leaves the container Waiting with reason `CreateContainerConfigError`; the agent retries.
  Indexed Jobs get JOB_COMPLETION_INDEX from the Job controller as a fieldRef; it resolves here.
- workingDir is created if missing; without one a Pod runs in the log directory.
- Output (stdout and stderr) goes to `<log-dir>/<namespace>_<pod>.log` (`pod_log_path`).

Termination messages
--------------------
A process cannot write to /dev/termination-log on a shared host, so each container start gets
its own file, `<log-dir>/<namespace>_<pod>.termination-log`, and finds it two ways:
- the environment variable `TERMINATION_MESSAGE_PATH` holds its path (workers should write to
  `$TERMINATION_MESSAGE_PATH`, falling back to `/dev/termination-log` in a real cluster);
- every occurrence of the container's `terminationMessagePath` (default /dev/termination-log)
  in command, args and env values is rewritten to that file, so `echo x > /dev/termination-log`
  in a shell command works unchanged.
The agent reads at most 4096 bytes into `state.terminated.message`; with
`terminationMessagePolicy: FallbackToLogsOnError` an empty message on failure becomes the log's
last 80 lines (at most 2048 bytes).

Lifecycle
---------
Pending -> Running (podIP/hostIP 127.0.0.1, running.startedAt) -> Succeeded/Failed with the exit
code (128+signal when killed), reason Completed/Error. restartPolicy OnFailure/Always restart the
process in place with restartCount+1 after a short back-off. A Pod with a deletionTimestamp gets
SIGTERM on its process group, SIGKILL after its grace period, a terminal status, then
`delete(gracePeriodSeconds=0)`; a Pod deleted before it started is marked Failed and removed at
once. activeDeadlineSeconds kills the Pod and fails it with reason DeadlineExceeded. Pods that
were Running when the agent (re)started have no process any more: they are marked Failed with
reason NodeAgentRestarted so their Jobs retry. SIGTERM to the agent kills every Pod process;
Pod processes also get PR_SET_PDEATHSIG, so they die if the agent dies.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import datetime as dt
import json
import os
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from beam_devstack.proc import ManagedProcess

DEFAULT_NODE = "local-node"
POD_IP = "127.0.0.1"
LEASE_SECONDS = 40
LEASE_RENEW = 10.0
NODE_STATUS_EVERY = 60.0
MAX_MESSAGE = 4096
KUBELET_VERSION = "v1.34.4"

VENV_BIN = os.path.dirname(sys.executable)

IMAGES: dict[str, dict[str, Any]] = {
    "beam-backfill/jobrunner": {"entrypoint": ["beam-jobrunner"], "cmd": [], "venv": True},
    "beam-backfill/operator": {"entrypoint": ["beam-operator"], "cmd": [], "venv": True},
    "beam-backfill/": {"entrypoint": [], "cmd": [], "venv": True},
    "python": {"entrypoint": [], "cmd": ["python3"], "venv": True, "env": {"LANG": "C.UTF-8"}},
    "busybox": {"entrypoint": [], "cmd": ["sh"], "venv": False},
    "alpine": {"entrypoint": [], "cmd": ["sh"], "venv": False},
}


def ensure_installed() -> None:
    """Nothing to fetch: the agent is Python plus util-linux's setpriv, if present."""


def pod_log_path(log_dir: Path | str, namespace: str, pod: str) -> Path:
    """Where the output of Pod `namespace/pod` goes."""
    return Path(log_dir) / f"{namespace}_{pod}.log"


def load_images(override: str | None) -> dict[str, dict[str, Any]]:
    table = {k: dict(v) for k, v in IMAGES.items()}
    for source in (os.environ.get("BEAM_NODE_AGENT_IMAGES"), override):
        if not source:
            continue
        text = source if source.lstrip().startswith("{") else Path(source).read_text()
        table.update(json.loads(text))
    return table


def image_repository(image: str) -> str:
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:  # a tag, not a registry port
        name = name[:colon]
    for prefix in ("docker.io/", "index.docker.io/", "library/"):
        if name.startswith(prefix):
            name = name[len(prefix) :]
    return name


def resolve_image(image: str, table: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    repo = image_repository(image)
    if repo in table:
        return table[repo]
    prefixes = [k for k in table if k.endswith("/") and repo.startswith(k)]
    return table[max(prefixes, key=len)] if prefixes else None


_VAR = re.compile(r"\$(\$|\(([^)]*)\))")


def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: $$ escapes, undefined references stay as written."""

    def sub(m: re.Match) -> str:
        if m.group(1) == "$":
            return "$"
        name = m.group(2)
        return env[name] if name in env else m.group(0)

    return _VAR.sub(sub, text)


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} nodeagent] {message}", file=sys.stderr, flush=True)


SETPRIV = shutil.which("setpriv")  # util-linux
_libc = ctypes.CDLL(None, use_errno=True)
_prctl = _libc.prctl


def _die_with_agent() -> None:
    _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: the pod dies if the agent dies


class ConfigError(Exception):
    def __init__(self, reason: str, message: str, retry: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retry = retry


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


class Api:
    """A small asyncio HTTP/1.1 client for the apiserver, JSON in and out.

    httpx costs several milliseconds of CPU per request in connection-pool bookkeeping, and the
    typed kubernetes client is slower still; with three requests per Pod and thousands of Pods
    on two cores that is the agent's whole budget. The apiserver speaks plain HTTP/1.1 with
    keep-alive, Content-Length or chunked bodies: that is all this client handles.
    """

    def __init__(self, kubeconfig: str, connections: int = 8) -> None:
        from kubernetes import client, config  # only to read kubeconfig files faithfully

        cfg = client.Configuration()
        config.load_kube_config(config_file=kubeconfig, client_configuration=cfg, persist_config=False)
        url = urllib.parse.urlsplit(cfg.host)
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (443 if url.scheme == "https" else 80)
        self.prefix = url.path.rstrip("/")
        self.ssl: ssl.SSLContext | None = None
        self.server_hostname = getattr(cfg, "tls_server_name", None) or self.host
        if url.scheme == "https":
            self.ssl = (
                ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.verify_ssl else ssl.create_default_context()
            )
            if not cfg.verify_ssl:
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                self.ssl.load_cert_chain(cfg.cert_file, cfg.key_file)
        head = f"Host: {url.netloc}\r\nAccept: application/json\r\nUser-Agent: beam-devstack-nodeagent\r\n"
        for value in cfg.api_key.values():
            head += f"Authorization: {value if value.startswith('Bearer ') else 'Bearer ' + value}\r\n"
        self.head = head
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.slots = asyncio.Semaphore(connections)

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(
                self.host,
                self.port,
                ssl=self.ssl,
                server_hostname=self.server_hostname if self.ssl else None,
                limit=1 << 22,
            ),
            10,
        )

    def request(self, method: str, path: str, params: dict | None, body: Any, ctype: str) -> bytes:
        if params:
            path = f"{path}?{urllib.parse.urlencode(params)}"
        content = orjson.dumps(body) if body is not None else b""
        head = f"{method} {self.prefix}{path} HTTP/1.1\r\n{self.head}"
        if body is not None:
            head += f"Content-Type: {ctype}\r\nContent-Length: {len(content)}\r\n"
        return head.encode() + b"\r\n" + content

    @staticmethod
    async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        line = await reader.readline()
        if not line:
            raise ConnectionResetError("connection closed by the apiserver")
        status = int(line.split()[1])
        headers = {}
        while True:
            line = await reader.readline()
            if line in (b"\r\n", b"\n", b""):
                return status, headers
            key, _, value = line.decode("latin-1").partition(":")
            headers[key.strip().lower()] = value.strip()

    @staticmethod
    async def chunks(reader: asyncio.StreamReader):
        while True:
            size = int((await reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)

    async def read_body(self, reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return b"".join([c async for c in self.chunks(reader)])
        length = int(headers.get("content-length", "0"))
        return await reader.readexactly(length) if length else b""

    async def exchange(self, data: bytes) -> tuple[int, bytes]:
        async with self.slots:
            conn = self.idle.pop() if self.idle else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = await self.connect()
                reader, writer = conn
                writer.write(data)
                async with asyncio.timeout(60):
                    await writer.drain()
                    status, headers = await self.read_head(reader)
                    body = await self.read_body(reader, headers)
            except BaseException as e:
                if conn is not None:
                    conn[1].close()
                if reused and isinstance(e, (ConnectionError, asyncio.IncompleteReadError)):
                    raise StaleConnection() from e
                raise
            if headers.get("connection", "").lower() == "close":
                writer.close()
            else:
                self.idle.append(conn)
            return status, body

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        ctype: str = "application/json",
        params: dict | None = None,
        ok404: bool = False,
    ) -> Any:
        data = self.request(method, path, params, body, ctype)
        attempt = 0
        while True:
            try:
                status, content = await self.exchange(data)
            except StaleConnection:
                continue  # the apiserver closed an idle keep-alive connection: not an attempt
            except (TimeoutError, OSError, asyncio.IncompleteReadError) as e:
                attempt += 1
                if attempt >= 6:
                    raise ApiError(0, f"{method} {path}: {e!r}") from e
                log(f"{method} {path}: {e!r}, retrying")
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if status in (429, 500, 502, 503, 504) and attempt < 5:
                attempt += 1
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if status == 404 and ok404:
                return None
            if status >= 400:
                raise ApiError(status, content.decode(errors="replace"))
            return orjson.loads(content) if content else None

    async def watch(self, path: str, params: dict):
        """Yield the events of one watch request until the apiserver ends it."""
        reader, writer = await self.connect()
        try:
            writer.write(self.request("GET", path, params, None, ""))
            await writer.drain()
            status, headers = await self.read_head(reader)
            if status >= 400:
                raise ApiError(status, (await self.read_body(reader, headers)).decode(errors="replace"))
            pending = b""
            async for chunk in self.chunks(reader):
                pending += chunk
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        yield orjson.loads(line)
        finally:
            writer.close()

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


class StaleConnection(Exception):
    pass


@dataclass(eq=False)
class PodRun:
    """What the agent knows about one Pod bound to its node."""

    uid: str
    namespace: str
    name: str
    pod: dict
    start_time: str = field(default_factory=_now)
    popen: subprocess.Popen | None = None
    pidfd: int = -1
    started_at: str | None = None
    restarts: int = 0
    last_state: dict | None = None
    conds: dict[str, tuple[str, str]] = field(default_factory=dict)
    terminating: bool = False  # deletion or deadline: do not restart
    deadline_exceeded: bool = False
    gone: bool = False  # the Pod object no longer exists
    terminal: bool = False
    pending_status: dict | None = None
    writer: asyncio.Task | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    config_attempts: int = 0

    @property
    def container(self) -> dict:
        return self.pod["spec"]["containers"][0]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Agent:
    def __init__(
        self, api: Api, node: str, log_dir: Path, images: dict[str, dict[str, Any]], ready_file: Path | None = None
    ) -> None:
        self.api = api
        self.node = node
        self.log_dir = log_dir
        self.images = images
        self.ready_file = ready_file
        self.runs: dict[str, PodRun] = {}
        # uids whose terminal status we wrote but the watch has not shown yet: a stale event
        # must not start them again.
        self.done: set[str] = set()
        self.binding: set[str] = set()
        self.tasks: set[asyncio.Task] = set()
        self.counts = {"bound": 0, "started": 0, "succeeded": 0, "failed": 0, "deleted": 0}
        self.node_uid = ""
        self.stopping = asyncio.Event()
        self.capacity = {"cpu": "256", "memory": "1Ti", "pods": "500", "ephemeral-storage": "1Ti"}
        self._cache: dict[tuple[str, str, str], tuple[float, dict | None]] = {}
        self._node_transitions: dict[str, tuple[str, str]] = {}

    # --- plumbing ---------------------------------------------------------------------------

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log(f"task failed: {task.exception()!r}")

    def later(self, run: PodRun, delay: float, fn, *args) -> None:
        run.timers.append(asyncio.get_running_loop().call_later(delay, fn, *args))

    # --- node and lease ---------------------------------------------------------------------

    async def register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node,
                "labels": {
                    "kubernetes.io/hostname": self.node,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "beam-backfill.dev/node-agent": "true",
                },
            },
        }
        try:
            node = await self.api.call("POST", "/api/v1/nodes", body)
        except ApiError as e:
            if e.status != 409:
                raise
            node = await self.api.call("GET", f"/api/v1/nodes/{self.node}")
        self.node_uid = node["metadata"]["uid"]
        await self.node_status()
        log(f"node {self.node} registered and Ready")

    async def node_status(self) -> None:
        now = _now()

        def cond(kind: str, status: str, reason: str, message: str) -> dict:
            return {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": now,
                "lastTransitionTime": self._node_transition(kind, status, now),
            }

        status = {
            "conditions": [
                cond(
                    "MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"
                ),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                cond("Ready", "True", "KubeletReady", "beam-devstack node agent is posting ready status"),
            ],
            "capacity": self.capacity,
            "allocatable": self.capacity,
            "addresses": [{"type": "InternalIP", "address": POD_IP}, {"type": "Hostname", "address": self.node}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 0}},
            "nodeInfo": {
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
                "kernelVersion": os.uname().release,
                "osImage": "beam-devstack host",
                "containerRuntimeVersion": "host-process://1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": "",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }
        await self.api.call(
            "PATCH",
            f"/api/v1/nodes/{self.node}/status",
            {"status": status},
            ctype="application/strategic-merge-patch+json",
        )

    def _node_transition(self, kind: str, status: str, now: str) -> str:
        old = self._node_transitions.get(kind)
        if old is None or old[0] != status:
            self._node_transitions[kind] = (status, now)
        return self._node_transitions[kind][1]

    async def heartbeat(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.node}"
        last_status = time.monotonic()
        while not self.stopping.is_set():
            spec = {"holderIdentity": self.node, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": _micro_now()}
            try:
                if (
                    await self.api.call("PATCH", path, {"spec": spec}, ctype="application/merge-patch+json", ok404=True)
                    is None
                ):
                    await self.api.call(
                        "POST",
                        "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                        {
                            "apiVersion": "coordination.k8s.io/v1",
                            "kind": "Lease",
                            "metadata": {
                                "name": self.node,
                                "namespace": "kube-node-lease",
                                "ownerReferences": [
                                    {"apiVersion": "v1", "kind": "Node", "name": self.node, "uid": self.node_uid}
                                ],
                            },
                            "spec": spec,
                        },
                    )
                if time.monotonic() - last_status >= NODE_STATUS_EVERY:
                    await self.node_status()
                    last_status = time.monotonic()
            except Exception as e:  # keep beating: a missed renewal is not fatal, a dead loop is
                log(f"heartbeat failed: {e!r}")
            try:
                await asyncio.wait_for(self.stopping.wait(), LEASE_RENEW)
            except TimeoutError:
                pass

    async def report(self) -> None:
        last = None
        while not self.stopping.is_set():
            try:
                await asyncio.wait_for(self.stopping.wait(), 30)
            except TimeoutError:
                pass
            now = dict(self.counts, running=sum(1 for r in self.runs.values() if r.popen is not None))
            if now != last:
                log("pods " + " ".join(f"{k}={v}" for k, v in now.items()))
                last = now

    # --- the Pod watch ----------------------------------------------------------------------

    async def list_pods(self, initial: bool) -> str:
        seen: set[str] = set()
        params: dict[str, str] = {"limit": "500"}
        while True:
            page = await self.api.call("GET", "/api/v1/pods", params=params)
            for pod in page["items"]:
                seen.add(pod["metadata"]["uid"])
                self.on_pod("ADDED", pod, initial=initial)
            cont = page["metadata"].get("continue")
            if not cont:
                break
            params = {"limit": "500", "continue": cont}
        for uid in [u for u in self.runs if u not in seen]:
            self.on_pod("DELETED", self.runs[uid].pod)
        self.done &= seen
        return page["metadata"]["resourceVersion"]

    async def watch_pods(self) -> None:
        rv: str | None = None
        initial = True
        while not self.stopping.is_set():
            try:
                if rv is None:
                    rv = await self.list_pods(initial=initial)
                    if initial and self.ready_file is not None:
                        self.ready_file.write_text(str(os.getpid()))
                        log("watching pods")
                    initial = False
                params = {"watch": "1", "resourceVersion": rv, "allowWatchBookmarks": "true", "timeoutSeconds": "300"}
                async with contextlib.aclosing(self.api.watch("/api/v1/pods", params)) as events:
                    async for event in events:
                        kind, obj = event["type"], event["object"]
                        if kind == "ERROR":
                            if obj.get("code") == 410:
                                rv = None
                            else:
                                log(f"watch error: {obj.get('message')}")
                            break
                        rv = obj["metadata"]["resourceVersion"]
                        if kind != "BOOKMARK":
                            self.on_pod(kind, obj)
            except ApiError as e:
                if e.status == 410:
                    rv = None
                    continue
                log(f"pod watch failed: {e}; resuming")
                await asyncio.sleep(1)
            except (OSError, asyncio.IncompleteReadError, ValueError) as e:
                log(f"pod watch interrupted: {e!r}; resuming")
                await asyncio.sleep(1)

    def on_pod(self, kind: str, pod: dict, initial: bool = False) -> None:
        meta, spec = pod["metadata"], pod["spec"]
        uid = meta["uid"]
        status = pod.get("status") or {}
        phase = status.get("phase", "Pending")
        run = self.runs.get(uid)
        if kind == "DELETED":
            self.done.discard(uid)
            if run is not None:
                run.pod = pod
                run.gone = True
                self.terminate(run)
            return
        node = spec.get("nodeName")
        if not node:
            if (
                spec.get("schedulerName", "default-scheduler") == "default-scheduler"
                and not meta.get("deletionTimestamp")
                and uid not in self.binding
            ):
                self.binding.add(uid)
                self.spawn(self.bind(pod))
            return
        if node != self.node:
            return
        if run is not None:
            run.pod = pod
            if meta.get("deletionTimestamp"):
                self.terminate(run)
            return
        if uid in self.done:
            if phase in ("Succeeded", "Failed"):
                self.done.discard(uid)  # the watch caught up with what we wrote
            else:
                return
        if phase in ("Succeeded", "Failed"):
            if meta.get("deletionTimestamp") and meta.get("deletionGracePeriodSeconds") != 0:
                self.spawn(self.remove(pod))
            return
        run = PodRun(
            uid=uid,
            namespace=meta["namespace"],
            name=meta["name"],
            pod=pod,
            start_time=status.get("startTime") or _now(),
        )
        for c in status.get("conditions") or []:
            run.conds[c["type"]] = (c.get("status", ""), c.get("lastTransitionTime") or _now())
        self.runs[uid] = run
        if initial and phase == "Running":
            self.finish(
                run,
                137,
                "ContainerStatusUnknown",
                "The node agent restarted while this container was running; its process is gone",
                pod_reason="NodeAgentRestarted",
                pod_message=f"node agent on {self.node} restarted; the Pod's process was lost",
            )
        elif meta.get("deletionTimestamp"):
            self.finish(
                run,
                137,
                "ContainerStatusUnknown",
                "The container could not be located when the pod was deleted.  The container used to be Running",
            )
        else:
            self.spawn(self.start(run))

    async def bind(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            await self.api.call(
                "POST",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/binding",
                {
                    "apiVersion": "v1",
                    "kind": "Binding",
                    "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"]},
                    "target": {"apiVersion": "v1", "kind": "Node", "name": self.node},
                },
            )
            self.counts["bound"] += 1
        except ApiError as e:
            if e.status not in (404, 409):
                log(f"binding {meta['namespace']}/{meta['name']} failed: {e}")
        finally:
            self.binding.discard(meta["uid"])

    async def remove(self, pod: dict) -> None:
        meta = pod["metadata"]
        try:
            await self.api.call(
                "DELETE",
                f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                {
                    "apiVersion": "v1",
                    "kind": "DeleteOptions",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": meta["uid"]},
                },
                ok404=True,
            )
            self.counts["deleted"] += 1
        except ApiError as e:
            if e.status != 409:  # 409: a newer Pod of that name; not ours to remove
                log(f"removing {meta['namespace']}/{meta['name']} failed: {e}")

    # --- container configuration -------------------------------------------------------------

    async def lookup(self, kind: str, namespace: str, name: str) -> dict | None:
        # Hundreds of Pods of one Job start together and read the same Secret: share a fresh read.
        key = (kind, namespace, name)
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < 2.0:
            return hit[1]
        obj = await self.api.call("GET", f"/api/v1/namespaces/{namespace}/{kind}/{name}", ok404=True)
        self._cache[key] = (time.monotonic(), obj)
        if len(self._cache) > 1000:
            self._cache.clear()
        return obj

    async def source_data(self, kind: str, namespace: str, name: str) -> dict[str, str] | None:
        obj = await self.lookup(kind, namespace, name)
        if obj is None:
            return None
        data = (
            {k: base64.b64decode(v).decode(errors="replace") for k, v in (obj.get("data") or {}).items()}
            if kind == "secrets"
            else dict(obj.get("data") or {})
        )
        if kind == "secrets":
            data.update(obj.get("stringData") or {})
        return data

    def field_value(self, pod: dict, path: str) -> str:
        meta = pod["metadata"]
        m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path) or re.fullmatch(
            r'metadata\.(labels|annotations)\["([^"]*)"\]', path
        )
        if m:
            return (meta.get(m.group(1)) or {}).get(m.group(2), "")
        if path in ("metadata.labels", "metadata.annotations"):
            items = sorted((meta.get(path.split(".")[1]) or {}).items())
            return "\n".join(f'{k}="{v}"' for k, v in items)
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.node,
            "spec.serviceAccountName": pod["spec"].get("serviceAccountName", ""),
            "status.podIP": POD_IP,
            "status.podIPs": POD_IP,
            "status.hostIP": POD_IP,
            "status.hostIPs": POD_IP,
        }
        if path not in simple:
            raise ConfigError("CreateContainerConfigError", f"unsupported fieldRef fieldPath {path!r}", False)
        return simple[path]

    async def env_value(self, pod: dict, container: dict, item: dict, env: dict[str, str]) -> str | None:
        ns = pod["metadata"]["namespace"]
        if "valueFrom" not in item:
            return expand(item.get("value", ""), env)
        source = item["valueFrom"]
        for ref_key, kind, label in (
            ("secretKeyRef", "secrets", "secret"),
            ("configMapKeyRef", "configmaps", "configmap"),
        ):
            ref = source.get(ref_key)
            if ref is None:
                continue
            data = await self.source_data(kind, ns, ref.get("name", ""))
            optional = ref.get("optional", False)
            if data is None:
                if optional:
                    return None
                raise ConfigError("CreateContainerConfigError", f'{label} "{ref.get("name", "")}" not found', True)
            if ref["key"] not in data:
                if optional:
                    return None
                title = "Secret" if kind == "secrets" else "ConfigMap"
                raise ConfigError(
                    "CreateContainerConfigError",
                    f"couldn't find key {ref['key']} in {title} {ns}/{ref.get('name', '')}",
                    True,
                )
            return data[ref["key"]]
        if "fieldRef" in source:
            return self.field_value(pod, source["fieldRef"]["fieldPath"])
        if "resourceFieldRef" in source:
            resource = source["resourceFieldRef"]["resource"]  # e.g. limits.cpu
            part, _, name = resource.partition(".")
            value = ((container.get("resources") or {}).get(part) or {}).get(name)
            return str(value if value is not None else self.capacity.get(name, "0"))
        raise ConfigError("CreateContainerConfigError", f"unsupported valueFrom in env {item.get('name')}", False)

    async def container_config(self, run: PodRun, term_file: Path) -> tuple[list[str], dict[str, str], Path]:
        pod, c = run.pod, run.container
        image = resolve_image(c.get("image", ""), self.images)
        if image is None:
            raise ConfigError(
                "ErrImagePull",
                f'image "{c.get("image", "")}" is not in the node agent\'s image table '
                f"(beam_devstack.nodeagent.IMAGES; extend it with BEAM_NODE_AGENT_IMAGES)",
                False,
            )
        path = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")
        if image.get("venv"):
            path = f"{VENV_BIN}:{path}"
        env: dict[str, str] = {
            "PATH": path,
            "HOME": os.environ.get("HOME", "/root"),
            "HOSTNAME": pod["spec"].get("hostname") or run.name,
        }
        env.update(image.get("env") or {})
        ns = run.namespace
        for source in c.get("envFrom") or []:
            for ref_key, kind, label in (
                ("configMapRef", "configmaps", "configmap"),
                ("secretRef", "secrets", "secret"),
            ):
                ref = source.get(ref_key)
                if ref is None:
                    continue
                data = await self.source_data(kind, ns, ref.get("name", ""))
                if data is None:
                    if ref.get("optional"):
                        continue
                    raise ConfigError("CreateContainerConfigError", f'{label} "{ref.get("name", "")}" not found', True)
                for k, v in data.items():
                    env[source.get("prefix", "") + k] = v
        for item in c.get("env") or []:
            value = await self.env_value(pod, c, item, env)
            if value is not None:
                env[item["name"]] = value
        spec_path = c.get("terminationMessagePath") or "/dev/termination-log"
        env = {k: v.replace(spec_path, str(term_file)) for k, v in env.items()}
        env["TERMINATION_MESSAGE_PATH"] = str(term_file)

        def words(ws: list[str]) -> list[str]:
            return [expand(w, env).replace(spec_path, str(term_file)) for w in ws]

        if c.get("command"):
            argv = words(c["command"]) + words(c.get("args") or [])
        else:
            argv = list(image.get("entrypoint") or []) + (
                words(c["args"]) if c.get("args") else list(image.get("cmd") or [])
            )
        if not argv:
            raise ConfigError("CreateContainerError", "no command specified", False)
        if image.get("venv") and argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        cwd = Path(c["workingDir"]) if c.get("workingDir") else self.log_dir
        cwd.mkdir(parents=True, exist_ok=True)
        return argv, env, cwd

    # --- running -----------------------------------------------------------------------------

    def term_file(self, run: PodRun) -> Path:
        return self.log_dir / f"{run.namespace}_{run.name}.termination-log"

    async def start(self, run: PodRun) -> None:
        if run.terminating or run.terminal:
            return
        if run.restarts == 0 and run.config_attempts == 0:
            deadline = run.pod["spec"].get("activeDeadlineSeconds")
            if deadline:
                started = dt.datetime.strptime(run.start_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
                left = deadline - (dt.datetime.now(dt.UTC) - started).total_seconds()
                self.later(run, max(0.0, left), self.deadline, run)
        term_file = self.term_file(run)
        try:
            argv, env, cwd = await self.container_config(run, term_file)
        except ConfigError as e:
            if run.terminating or run.terminal:
                return
            run.config_attempts += 1
            self.set_status(
                run, self.pod_status(run, "Pending", {"waiting": {"reason": e.reason, "message": e.message}})
            )
            if e.retry:
                self.later(run, min(10.0, 1.0 * run.config_attempts), lambda: self.spawn(self.start(run)))
            return
        except ApiError as e:
            log(f"{run.key}: reading its configuration failed: {e}; retrying")
            self.later(run, 2.0, lambda: self.spawn(self.start(run)))
            return
        if run.terminating or run.terminal:
            return
        term_file.write_bytes(b"")
        run.started_at = _now()
        executable = shutil.which(argv[0], path=env["PATH"])
        if executable is None:
            self.exited(run, 128, "StartError", f'exec: "{argv[0]}": executable file not found in $PATH')
            return
        if SETPRIV:
            # setpriv sets the parent-death signal and execs: Popen can then vfork, which costs
            # the agent far less than fork plus a Python preexec_fn, and never blocks it.
            argv, preexec = [SETPRIV, "--pdeathsig", "KILL", "--", executable, *argv[1:]], None
        else:
            argv, preexec = [executable, *argv[1:]], _die_with_agent
        try:
            with open(pod_log_path(self.log_dir, run.namespace, run.name), "ab") as out:
                run.popen = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=preexec,
                )
        except OSError as e:
            self.exited(run, 128, "StartError", f"failed to start container process {argv[0]!r}: {e}")
            return
        self.counts["started"] += 1
        run.pidfd = os.pidfd_open(run.popen.pid)
        asyncio.get_running_loop().add_reader(run.pidfd, self.reap, run)
        self.set_status(run, self.pod_status(run, "Running", {"running": {"startedAt": run.started_at}}, ready=True))

    def reap(self, run: PodRun) -> None:
        asyncio.get_running_loop().remove_reader(run.pidfd)
        os.close(run.pidfd)
        run.pidfd = -1
        popen, run.popen = run.popen, None
        code = popen.wait()
        try:  # whatever the container's main process left behind dies with it, as in a runtime
            os.killpg(popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        code = 128 - code if code < 0 else code
        self.exited(run, code, "Completed" if code == 0 else "Error", self.termination_message(run, code))

    def termination_message(self, run: PodRun, code: int) -> str:
        term_file = self.term_file(run)
        try:
            with open(term_file, "rb") as f:
                message = f.read(MAX_MESSAGE).decode(errors="replace")
            term_file.unlink()
        except FileNotFoundError:
            message = ""
        if not message and code != 0 and run.container.get("terminationMessagePolicy") == "FallbackToLogsOnError":
            try:
                with open(pod_log_path(self.log_dir, run.namespace, run.name), "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - 2048))
                    tail = f.read().decode(errors="replace")
                message = "\n".join(tail.splitlines()[-80:])
            except FileNotFoundError:
                pass
        return message

    def exited(self, run: PodRun, code: int, reason: str, message: str) -> None:
        policy = run.pod["spec"].get("restartPolicy", "Always")
        restart = not run.terminating and (policy == "Always" or (policy == "OnFailure" and code != 0))
        if not restart:
            self.finish(run, code, reason, message)
            return
        run.last_state = {"terminated": self.terminated(run, code, reason, message)}
        run.restarts += 1
        delay = min(30.0, 1.0 * 2 ** min(run.restarts - 1, 5))
        self.set_status(
            run,
            self.pod_status(
                run,
                "Running",
                {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off {delay:.0f}s restarting failed container",
                    }
                },
            ),
        )
        self.later(run, delay, lambda: self.spawn(self.start(run)))

    def terminated(self, run: PodRun, code: int, reason: str, message: str) -> dict:
        t = {"exitCode": code, "reason": reason, "startedAt": run.started_at, "finishedAt": _now()}
        if message:
            t["message"] = message
        return t

    def finish(
        self,
        run: PodRun,
        code: int,
        reason: str,
        message: str,
        *,
        pod_reason: str | None = None,
        pod_message: str | None = None,
    ) -> None:
        """The Pod is over: write its terminal status, then remove it if it is being deleted."""
        if run.terminal:
            return
        run.terminal = True
        for timer in run.timers:
            timer.cancel()
        if run.deadline_exceeded:
            pod_reason = "DeadlineExceeded"
            pod_message = "Pod was active on the node longer than the specified deadline"
        phase = "Succeeded" if code == 0 and not run.deadline_exceeded else "Failed"
        self.counts["succeeded" if phase == "Succeeded" else "failed"] += 1
        log(f"{run.key} {phase.lower()}: exit {code} ({reason})")
        self.set_status(
            run,
            self.pod_status(
                run,
                phase,
                {"terminated": self.terminated(run, code, reason, message)},
                reason=pod_reason,
                message=pod_message,
            ),
        )

    def after_terminal_write(self, run: PodRun) -> None:
        self.runs.pop(run.uid, None)
        if run.gone:
            return
        self.done.add(run.uid)
        if run.pod["metadata"].get("deletionTimestamp"):
            self.spawn(self.remove(run.pod))

    def deadline(self, run: PodRun) -> None:
        if run.terminal:
            return
        run.deadline_exceeded = True
        log(f"{run.key}: activeDeadlineSeconds exceeded")
        self.terminate(run)

    def terminate(self, run: PodRun) -> None:
        """Stop the Pod's process: SIGTERM to its group, SIGKILL after the grace period."""
        if run.terminating:
            return
        run.terminating = True
        if run.popen is None:
            if not run.gone:
                self.finish(
                    run, 137, "ContainerStatusUnknown", "The container could not be located when the pod was terminated"
                )
            else:
                run.terminal = True
                self.runs.pop(run.uid, None)
            return
        meta = run.pod["metadata"]
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = run.pod["spec"].get("terminationGracePeriodSeconds", 30)
        log(f"{run.key}: stopping (grace {grace}s)")
        pid = run.popen.pid
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        self.later(run, float(grace), self.kill, run)

    def kill(self, run: PodRun) -> None:
        if run.popen is not None:
            try:
                os.killpg(run.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    # --- status ------------------------------------------------------------------------------

    def pod_status(
        self,
        run: PodRun,
        phase: str,
        state: dict,
        *,
        ready: bool = False,
        reason: str | None = None,
        message: str | None = None,
    ) -> dict:
        now = _now()
        c = run.container
        terminal = phase in ("Succeeded", "Failed")

        def cond(kind: str, ok: bool, why: str | None = None, text: str | None = None) -> dict:
            value = "True" if ok else "False"
            if run.conds.get(kind, ("",))[0] != value:
                run.conds[kind] = (value, now)
            out = {"type": kind, "status": value, "lastProbeTime": None, "lastTransitionTime": run.conds[kind][1]}
            if why and not ok:
                out["reason"] = why
                if text:
                    out["message"] = text
            return out

        unready = "PodCompleted" if terminal else "ContainersNotReady"
        text = None if terminal else f"containers with unready status: [{c['name']}]"
        container = {
            "name": c["name"],
            "image": c.get("image", ""),
            "imageID": "",
            "containerID": f"host-process://{run.uid}/{run.restarts}",
            "ready": ready,
            "started": "running" in state,
            "restartCount": run.restarts,
            "state": state,
            "lastState": run.last_state or {},
        }
        status = {
            "phase": phase,
            "conditions": [
                cond("PodReadyToStartContainers", not terminal),
                cond("Initialized", True),
                cond("ContainersReady", ready, unready, text),
                cond("Ready", ready, unready, text),
                cond("PodScheduled", True),
            ],
            "containerStatuses": [container],
            "hostIP": POD_IP,
            "hostIPs": [{"ip": POD_IP}],
            "podIP": POD_IP,
            "podIPs": [{"ip": POD_IP}],
            "startTime": run.start_time,
        }
        if reason:
            status["reason"] = reason
            status["message"] = message or ""
        return status

    def set_status(self, run: PodRun, status: dict) -> None:
        # One writer per Pod: patches of one Pod must not overtake each other, and a status
        # superseded while a patch is in flight is never sent at all.
        run.pending_status = status
        if run.writer is None:
            run.writer = self.spawn(self.write_status(run))

    async def write_status(self, run: PodRun) -> None:
        try:
            while run.pending_status is not None and not run.gone:
                status, run.pending_status = run.pending_status, None
                try:
                    await self.api.call(
                        "PATCH",
                        f"/api/v1/namespaces/{run.namespace}/pods/{run.name}/status",
                        {"metadata": {"uid": run.uid}, "status": status},
                        ctype="application/strategic-merge-patch+json",
                        ok404=True,
                    )
                except ApiError as e:
                    log(f"{run.key}: status update failed: {e}")
                    if (e.status == 0 or e.status >= 500) and not self.stopping.is_set():
                        # The apiserver is away: a lost terminal status would strand the Job.
                        if run.pending_status is None:
                            run.pending_status = status
                        await asyncio.sleep(2)
        finally:
            run.writer = None
        if run.terminal and run.pending_status is None:
            self.after_terminal_write(run)

    # --- shutdown ----------------------------------------------------------------------------

    def kill_all(self, grace: float) -> None:
        procs = [r.popen for r in self.runs.values() if r.popen is not None]
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if procs:
            log(f"killed {len(procs)} pod processes")

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        await self.register()
        background = [self.spawn(self.heartbeat()), self.spawn(self.report())]
        watcher = self.spawn(self.watch_pods())
        stop = self.spawn(self.stopping.wait())
        await asyncio.wait([watcher, stop], return_when=asyncio.FIRST_COMPLETED)
        self.stopping.set()
        log("stopping: " + " ".join(f"{k}={v}" for k, v in self.counts.items()))
        self.kill_all(grace=3.0)
        for task in [watcher, *background]:
            task.cancel()
        await self.api.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m beam_devstack.nodeagent", description=__doc__.split("\n")[0])
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--node-name", default=DEFAULT_NODE)
    parser.add_argument("--log-dir", required=True, type=Path)
    parser.add_argument("--images", help="JSON object or file adding to the image table")
    parser.add_argument("--ready-file", type=Path, help="written once the node is Ready and Pods are listed")
    args = parser.parse_args(argv)
    # One pidfd per running Pod: hundreds of Pods would exhaust the usual soft limit of 1024.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else max(soft, 65536), hard))
    agent = Agent(
        Api(args.kubeconfig), args.node_name, args.log_dir.resolve(), load_images(args.images), args.ready_file
    )
    asyncio.run(agent.run())


class NodeAgent:
    """The node agent as a managed process: `start()` returns once its Node is Ready."""

    def __init__(
        self,
        run_dir: Path,
        *,
        kubeconfig: Path | str,
        node_name: str = DEFAULT_NODE,
        detach: bool = False,
        pid_dir: Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.kubeconfig = Path(kubeconfig)
        self.node_name = node_name
        self.log_dir = self.run_dir / "pods"
        self.log_path = self.run_dir / "nodeagent.log"
        self._ready = self.run_dir / "nodeagent.ready"
        self.proc = ManagedProcess(
            "nodeagent",
            [
                sys.executable,
                "-m",
                "beam_devstack.nodeagent",
                "--kubeconfig",
                self.kubeconfig,
                "--node-name",
                node_name,
                "--log-dir",
                self.log_dir,
                "--ready-file",
                self._ready,
            ],
            log_path=self.log_path,
            detach=detach,
            pid_dir=pid_dir,
        )

    def start(self) -> NodeAgent:
        self._ready.unlink(missing_ok=True)
        self.proc.start()
        self.proc.wait_ready(self._ready.exists, timeout=60, what="registered")
        return self

    def stop(self) -> None:
        self.proc.stop()

    def endpoints(self) -> dict:
        return {"node_name": self.node_name, "log_dir": str(self.log_dir), "log": str(self.log_path)}

    def pod_log_path(self, namespace: str, pod: str) -> Path:
        return pod_log_path(self.log_dir, namespace, pod)


if __name__ == "__main__":
    main()
