"""A local Kubernetes control plane made of plain processes: etcd, kube-apiserver and
kube-controller-manager, with no node and no container runtime.

This is what controller-runtime's envtest runs, plus a controller manager so that the
behaviour the operator relies on is real: Jobs create Pods, ownerReferences are garbage
collected, finished Jobs expire, namespaces are finalized and get their default ServiceAccount.
Pods stay Pending unless a node runs them: with node_ip, beam_devstack.substrate.node is that node.

The binaries cannot be downloaded as releases on our CI machines, so hack/build-control-plane.sh
builds them from the Go module proxy once and caches them by version.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import os
import re
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from beam_devstack.substrate.pki import issue_cert, make_ca
from beam_devstack.substrate.proc import CACHE, ManagedProcess, free_port, progress

if TYPE_CHECKING:
    from kubernetes.client import ApiClient

K8S_VERSION = "v1.34.4"
ETCD_VERSION = "v3.6.4"
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "build-control-plane.sh"

ETCD_BIN = CACHE / "bin" / f"etcd-{ETCD_VERSION}" / "etcd"
APISERVER_BIN = CACHE / "bin" / f"kubernetes-{K8S_VERSION}" / "kube-apiserver"
CONTROLLER_MANAGER_BIN = CACHE / "bin" / f"kubernetes-{K8S_VERSION}" / "kube-controller-manager"

ADMIN_USER = "beam-admin"
SERVICE_CIDR = "10.0.0.0/24"
# kubeadm's default issuer: independent of the port, so tokens survive an apiserver restart.
SA_ISSUER = "https://kubernetes.default.svc.cluster.local"

# Only what the operator's behaviour depends on; each extra controller costs CPU on 2 cores.
CONTROLLERS = [
    "job-controller",
    "garbage-collector-controller",
    "ttl-after-finished-controller",
    "namespace-controller",
    "serviceaccount-controller",
    "serviceaccount-token-controller",
    # Pods admitted with a ServiceAccount mount kube-root-ca.crt; real clusters publish it.
    "root-ca-certificate-publisher-controller",
    # A ResourceQuota per organization is how shared clusters cap tenants; the operator must
    # turn a refusal by one into a failed backfill (tests/e2e).
    "resourcequota-controller",
]
# With a real node (node.py): its heartbeat and Pod garbage collection, the EndpointSlices
# kube-proxy reads for Services, and Deployments for the chart's operator and API.
NODE_CONTROLLERS = [
    "node-lifecycle-controller",
    "pod-garbage-collector-controller",
    "endpoints-controller",
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "replicaset-controller",
    "deployment-controller",
]


def ensure_installed() -> None:
    """Build the binaries from the Go module proxy if they are not cached yet."""
    if all(p.is_file() and os.access(p, os.X_OK) for p in (ETCD_BIN, APISERVER_BIN, CONTROLLER_MANAGER_BIN)):
        return
    if not BUILD_SCRIPT.is_file():
        raise RuntimeError(f"control plane binaries missing and {BUILD_SCRIPT} not found (run from a checkout)")
    progress("k8s", f"building etcd {ETCD_VERSION} and Kubernetes {K8S_VERSION} with {BUILD_SCRIPT.name}")
    env = dict(os.environ, BEAM_CACHE=str(CACHE), K8S_VERSION=K8S_VERSION, ETCD_VERSION=ETCD_VERSION)
    started = time.monotonic()
    # stderr is inherited: the script prints its own progress lines while it compiles.
    subprocess.run(["bash", str(BUILD_SCRIPT), "all"], env=env, check=True)
    progress("k8s", f"binaries built in {time.monotonic() - started:.0f}s")


# --- certificates ------------------------------------------------------------------------


def _write_pki(pki: Path, extra_ips: tuple[str, ...] = ()) -> None:
    """CA, apiserver serving cert, admin client cert, ServiceAccount signing key."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    pki.mkdir(parents=True, exist_ok=True)
    ca, ca_key = make_ca(pki / "ca", "beam-backfill-local-ca")
    issue_cert(
        pki / "apiserver",
        ca,
        ca_key,
        "kube-apiserver",
        server=True,
        # The first address of the service range is the in-cluster `kubernetes` Service.
        ips=("127.0.0.1", *extra_ips, str(next(ipaddress.ip_network(SERVICE_CIDR).hosts()))),
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
    )
    # Group system:masters is bound to cluster-admin by the bootstrap RBAC policy.
    issue_cert(pki / "admin", ca, ca_key, ADMIN_USER, org="system:masters")

    sa_key = ec.generate_private_key(ec.SECP256R1())
    for name, data in (
        (
            "sa.key",
            sa_key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
        ),
        (
            "sa.pub",
            sa_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        ),
    ):
        (pki / name).write_bytes(data)
        (pki / name).chmod(0o600)


def _b64(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def _kubeconfig(server: str, ca: Path, user_name: str, user: dict[str, str], namespace: str = "default") -> str:
    ctx = "beam-local"
    return yaml.safe_dump(
        {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": ctx, "cluster": {"server": server, "certificate-authority-data": _b64(ca)}}],
            "users": [{"name": user_name, "user": user}],
            "contexts": [{"name": ctx, "context": {"cluster": ctx, "user": user_name, "namespace": namespace}}],
            "current-context": ctx,
            "preferences": {},
        },
        sort_keys=False,
    )


# --- the control plane ---------------------------------------------------------------------


class ApiError(RuntimeError):
    def __init__(self, status: int, body: str, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body


class ControlPlane:
    """etcd + kube-apiserver + kube-controller-manager on free 127.0.0.1 ports.

    Each start() begins from an empty etcd and fresh certificates under run_dir. With node_ip
    (the bridge address of a real node, node.py) kube-apiserver binds and advertises that address
    instead, so Pods reach it through the `kubernetes` Service, it can reach the kubelet for logs
    and exec, and the controllers a node needs run too.
    """

    def __init__(
        self, run_dir: Path, *, detach: bool = False, pid_dir: Path | None = None, node_ip: str | None = None
    ) -> None:
        self.run_dir = Path(run_dir)
        self.node_ip = node_ip
        self.detach = detach
        self.pid_dir = pid_dir
        self.pki = self.run_dir / "pki"
        self.kubeconfig = self.run_dir / "kubeconfig"
        self.etcd: ManagedProcess | None = None
        self.apiserver: ManagedProcess | None = None
        self.controller_manager: ManagedProcess | None = None
        self.etcd_port = self.etcd_peer_port = self.port = self.kcm_port = 0
        self.start_seconds: float | None = None
        self._ssl: ssl.SSLContext | None = None
        self._client: ApiClient | None = None
        self._client_lock = threading.Lock()

    # -- public interface --

    @property
    def server(self) -> str:
        return f"https://{self.node_ip or '127.0.0.1'}:{self.port}"

    def endpoints(self) -> dict[str, Any]:
        return {"kubeconfig": str(self.kubeconfig), "server": self.server}

    def start(self) -> ControlPlane:
        ensure_installed()
        started = time.monotonic()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("etcd", "pki", "kcm-certs", "kubeconfigs"):
            shutil.rmtree(self.run_dir / stale, ignore_errors=True)
        _write_pki(self.pki, (self.node_ip,) if self.node_ip else ())
        self._ssl = None
        self._close_client()
        self.etcd_port, self.etcd_peer_port, self.port, self.kcm_port = (free_port() for _ in range(4))
        self.kubeconfig.write_text(
            _kubeconfig(
                self.server,
                self.pki / "ca.crt",
                ADMIN_USER,
                {
                    "client-certificate-data": _b64(self.pki / "admin.crt"),
                    "client-key-data": _b64(self.pki / "admin.key"),
                },
            )
        )
        self.kubeconfig.chmod(0o600)
        try:
            self._start_etcd()
            self._start_apiserver()
            self._start_controller_manager()
            self._wait_default_service_account()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - started
        progress(
            "k8s", f"control plane ready at {self.server} in {self.start_seconds:.1f}s (kubeconfig {self.kubeconfig})"
        )
        return self

    def stop(self) -> None:
        for proc in (self.controller_manager, self.apiserver, self.etcd):
            if proc is not None:
                proc.stop()
        self._close_client()

    def restart_apiserver(self, downtime: float = 0.0) -> None:
        """Stop kube-apiserver and start it again on the same port against the same etcd."""
        assert self.apiserver is not None, "start() first"
        self.apiserver.stop()
        # Its pooled connections are dead: api() starts over with a new client.
        self._close_client()
        progress("k8s", f"kube-apiserver stopped; restarting in {downtime:.1f}s")
        if downtime:
            time.sleep(downtime)
        self._start_apiserver()

    def api(self, method: str, path: str, body: Any = None, *, timeout: float = 10) -> Any:
        """One admin request to the apiserver, through the kubernetes client's REST layer (one
        pooled ApiClient per control plane, admin client certificate). JSON in (a merge patch for
        PATCH), JSON out: the parsed answer, None when it is empty, its text when it is not JSON.

        Raises ApiError for any status outside 2xx, with the server's body. A single attempt, no
        retries; `timeout` bounds the connection and each read. Transport failures (refused,
        reset, timed out) raise urllib3's exceptions, a TLS failure the client's ApiException."""
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        # call_api only sends (no deserialization, no auth settings) and never raises on a status.
        resp = self._api_client().call_api(
            method,
            self.server + path,
            header_params={"Content-Type": content_type},
            body=body,
            _request_timeout=(timeout, timeout),
        )
        raw = resp.read()  # all of it, which hands the connection back to the pool
        if not 200 <= resp.status < 300:
            raise ApiError(resp.status, raw.decode(errors="replace"), method, path)
        if not raw:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def kubectl(
        self, *args: str, kubeconfig: Path | None = None, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess:
        """Run the machine's kubectl against this control plane."""
        env = dict(os.environ, KUBECONFIG=str(kubeconfig or self.kubeconfig))
        proc = subprocess.run(["kubectl", *args], env=env, capture_output=True, text=True, input=input, timeout=60)
        if check and proc.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc

    def create_namespace(self, name: str, *, wait_service_account: bool = True, timeout: float = 30) -> str:
        """Create a namespace; by default wait for its `default` ServiceAccount, without which the
        ServiceAccount admission plugin rejects Pods (and so the Job controller's first tries)."""
        self.api("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        if wait_service_account:
            self._wait(
                lambda: self._exists(f"/api/v1/namespaces/{name}/serviceaccounts/default"),
                timeout,
                f"ServiceAccount {name}/default",
            )
        return name

    def delete_namespace(self, name: str) -> None:
        """Ask for deletion; the namespace controller empties and removes it in the background."""
        try:
            self.api("DELETE", f"/api/v1/namespaces/{name}")
        except ApiError as e:
            if e.status != 404:
                raise

    def kubeconfig_for_service_account(
        self, namespace: str, name: str, *, create: bool = True, expiration_seconds: int = 24 * 3600
    ) -> Path:
        """A kubeconfig that authenticates as ServiceAccount namespace/name with a bound token
        from the TokenRequest API, so code can run under exactly the RBAC a Role grants it."""
        if create and not self._exists(f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}"):
            try:
                self.api(
                    "POST",
                    f"/api/v1/namespaces/{namespace}/serviceaccounts",
                    {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
                )
            except ApiError as e:
                if e.status != 409:
                    raise
        review = self.api(
            "POST",
            f"/api/v1/namespaces/{namespace}/serviceaccounts/{name}/token",
            {
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenRequest",
                "spec": {"expirationSeconds": expiration_seconds},
            },
        )
        path = self.run_dir / "kubeconfigs" / f"sa-{namespace}-{name}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            _kubeconfig(
                self.server,
                self.pki / "ca.crt",
                f"system:serviceaccount:{namespace}:{name}",
                {"token": review["status"]["token"]},
                namespace=namespace,
            )
        )
        path.chmod(0o600)
        return path

    # -- processes --

    def _proc(self, name: str, argv: list[str]) -> ManagedProcess:
        return ManagedProcess(
            name, argv, log_path=self.run_dir / "logs" / f"{name}.log", detach=self.detach, pid_dir=self.pid_dir
        )

    def _start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.etcd_port}"
        peer = f"http://127.0.0.1:{self.etcd_peer_port}"
        self.etcd = self._proc(
            "etcd",
            [
                ETCD_BIN,
                "--name=beam-local",
                f"--data-dir={self.run_dir / 'etcd'}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=beam-local={peer}",
                # Test data is thrown away with the run dir; fsync would only cost time.
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        ).start()
        progress("k8s", f"etcd {ETCD_VERSION} starting on {client}")
        self.etcd.wait_ready(lambda: self._http_ok(f"{client}/health", '"health":"true"'), 30, "healthy")

    def _apiserver_argv(self) -> list[str]:
        pki = self.pki
        return [
            APISERVER_BIN,
            f"--etcd-servers=http://127.0.0.1:{self.etcd_port}",
            f"--bind-address={self.node_ip or '127.0.0.1'}",
            f"--advertise-address={self.node_ip or '127.0.0.1'}",
            f"--secure-port={self.port}",
            f"--cert-dir={self.run_dir / 'apiserver-certs'}",
            f"--tls-cert-file={pki / 'apiserver.crt'}",
            f"--tls-private-key-file={pki / 'apiserver.key'}",
            f"--client-ca-file={pki / 'ca.crt'}",
            f"--service-cluster-ip-range={SERVICE_CIDR}",
            "--allow-privileged=true",
            "--authorization-mode=Node,RBAC",
            f"--service-account-issuer={SA_ISSUER}",
            f"--service-account-key-file={pki / 'sa.pub'}",
            f"--service-account-signing-key-file={pki / 'sa.key'}",
            "--profiling=false",
            # Without a bound, SIGTERM waits on open watches (the controller manager's) and
            # restart_apiserver() would end in SIGKILL after the stop grace.
            "--shutdown-watch-termination-grace-period=2s",
            *self._kubelet_client_argv(),
        ]

    def _kubelet_client_argv(self) -> list[str]:
        """`kubectl logs` and `exec` go through the kubelet, at the node's InternalIP."""
        if not self.node_ip:
            return []
        pki = self.pki
        return [
            f"--kubelet-client-certificate={pki / 'admin.crt'}",
            f"--kubelet-client-key={pki / 'admin.key'}",
            f"--kubelet-certificate-authority={pki / 'ca.crt'}",
            "--kubelet-preferred-address-types=InternalIP",
        ]

    def _start_apiserver(self) -> None:
        self.apiserver = self._proc("kube-apiserver", self._apiserver_argv()).start()
        progress("k8s", f"kube-apiserver {K8S_VERSION} starting on {self.server}")
        self.apiserver.wait_ready(lambda: self._http_ok(f"{self.server}/readyz", "ok"), 90, "ready (/readyz)")
        # The apiserver's bootstrap controller creates it; clients assume it exists.
        self.apiserver.wait_ready(lambda: self._exists("/api/v1/namespaces/default"), 30, "serving namespace default")

    def _start_controller_manager(self) -> None:
        pki = self.pki
        self.controller_manager = self._proc(
            "kube-controller-manager",
            [
                CONTROLLER_MANAGER_BIN,
                f"--kubeconfig={self.kubeconfig}",
                f"--controllers={','.join(CONTROLLERS + (NODE_CONTROLLERS if self.node_ip else []))}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.kcm_port}",
                f"--cert-dir={self.run_dir / 'kcm-certs'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                # Leader election would make it exit when the apiserver is down longer than the
                # renew deadline (restart_apiserver, resilience tests); there is only one anyway.
                "--leader-elect=false",
                # The defaults (20 qps) throttle the Job controller and GC under test load.
                "--kube-api-qps=200",
                "--kube-api-burst=400",
                "--profiling=false",
            ],
        ).start()
        progress("k8s", "kube-controller-manager starting")
        self.controller_manager.wait_ready(
            lambda: self._http_ok(f"https://127.0.0.1:{self.kcm_port}/healthz", "ok", verify=False), 60, "healthy"
        )

    def _wait_default_service_account(self) -> None:
        assert self.controller_manager is not None
        self.controller_manager.wait_ready(
            lambda: self._exists("/api/v1/namespaces/default/serviceaccounts/default"),
            60,
            "done creating ServiceAccount default/default",
        )

    # -- helpers --

    def _api_client(self) -> ApiClient:
        with self._client_lock:
            if self._client is None:
                from kubernetes import client

                cfg = client.Configuration()
                cfg.host = self.server
                cfg.ssl_ca_cert = str(self.pki / "ca.crt")
                cfg.cert_file, cfg.key_file = str(self.pki / "admin.crt"), str(self.pki / "admin.key")
                # One attempt, as a plain HTTP client makes: urllib3's default would resend GETs
                # after a read timeout (multiplying `timeout`) and honour Retry-After on 429/503.
                cfg.retries = False
                self._client = client.ApiClient(cfg)
            return self._client

    def _close_client(self) -> None:
        with self._client_lock:
            if self._client is not None:
                self._client.close()  # closes the pooled connections
                self._client = None

    def _ssl_context(self) -> ssl.SSLContext:
        """For the readiness probes (_http_ok), which use urllib."""
        if self._ssl is None:
            ctx = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
            ctx.load_cert_chain(str(self.pki / "admin.crt"), str(self.pki / "admin.key"))
            self._ssl = ctx
        return self._ssl

    def _http_ok(self, url: str, expect: str, *, verify: bool = True) -> bool:
        if url.startswith("https://"):
            ctx = self._ssl_context() if verify else ssl._create_unverified_context()  # noqa: S323 - kcm's self-signed cert
        else:
            ctx = None
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:
                return resp.status == 200 and expect in resp.read().decode(errors="replace")
        except (urllib.error.URLError, OSError):
            return False

    def _exists(self, path: str) -> bool:
        try:
            self.api("GET", path, timeout=5)
            return True
        except ApiError as e:
            if e.status == 404:
                return False
            raise

    @staticmethod
    def _wait(check, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{what} not there after {timeout:.0f}s")


def unique_name(prefix: str) -> str:
    """A DNS-1123 label (namespaces, objects) from free text plus a random suffix."""
    base = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-")[:50].strip("-") or "x"
    return f"{base}-{uuid.uuid4().hex[:6]}"


def main() -> None:
    """`python -m beam_devstack.substrate.k8s [RUN_DIR]`: run a control plane in the foreground
    until Ctrl-C."""
    import sys
    import tempfile

    run_dir = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="beam-k8s-"))
    plane = ControlPlane(run_dir).start()
    print(json.dumps(plane.endpoints()), flush=True)
    print(f"export KUBECONFIG={plane.kubeconfig}", flush=True)
    try:
        while all(p is not None and p.alive() for p in (plane.etcd, plane.apiserver, plane.controller_manager)):
            time.sleep(1)
        progress("k8s", "a control plane process exited; see the logs under " + str(run_dir / "logs"))
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()


if __name__ == "__main__":
    main()
