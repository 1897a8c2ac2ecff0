"""The REST API as a real uvicorn process, and the chart's API identity on the control plane."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import httpx
import yaml

from beam_devstack.operator_proc import CHART
from beam_devstack.substrate.proc import ManagedProcess, free_port, progress

# A release and namespaces of its own: tests/chart installs the chart as release "beam" into
# beam-system later in the same session, and must not find objects of ours there.
RELEASE = "beam-apitest"
API_NS = "beam-apitest"
KEYS_NS = "beam-apitest-keys"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def ensure_namespace(k8s, name: str) -> None:
    try:
        k8s.create_namespace(name, wait_service_account=False)
    except Exception as e:
        if "409" not in str(e) and "AlreadyExists" not in str(e):
            raise


def install_chart_identities(k8s, helm: str) -> dict[str, Path]:
    """Apply the chart's ServiceAccounts and RBAC with api.enabled; kubeconfigs for the API's and
    the operator's identities: {"api": ..., "operator": ...}."""
    for ns in (API_NS, KEYS_NS):
        ensure_namespace(k8s, ns)
    rendered = subprocess.run(
        [
            helm,
            "template",
            RELEASE,
            str(CHART),
            "--namespace",
            API_NS,
            "--set",
            "api.enabled=true",
            "--set",
            f"api.apiKeysNamespace={KEYS_NS}",
            # The aggregated admin/edit/view rules would change what other tests' users may do.
            "--set",
            "rbac.aggregateToDefaultRoles=false",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    k8s.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in docs if d["kind"] in RBAC_KINDS))
    accounts = {}
    for d in docs:
        if d["kind"] == "Deployment":
            component = d["metadata"]["labels"]["app.kubernetes.io/component"]
            sa = d["spec"]["template"]["spec"]["serviceAccountName"]
            accounts[component] = k8s.kubeconfig_for_service_account(API_NS, sa, create=False)
    return accounts


class ApiProcess:
    """`beam-api serve` on a free port, configured through env as the chart's Deployment does."""

    def __init__(
        self,
        run_dir: Path,
        *,
        kubeconfig: Path,
        rate: float = 1000,
        burst: int = 1000,
        key_cache_seconds: float = 0.5,
        extra: dict[str, str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.port = free_port()
        self.env = dict(
            os.environ,
            KUBECONFIG=str(kubeconfig),
            BEAM_API_KEYS_NAMESPACE=KEYS_NS,
            BEAM_API_RATE_LIMIT_PER_SECOND=str(rate),
            BEAM_API_RATE_LIMIT_BURST=str(burst),
            BEAM_API_KEY_CACHE_SECONDS=str(key_cache_seconds),
            BEAM_API_ACCESS_LOG="0",
            # The kubernetes client writes the kubeconfig's CA to a temporary file: in the run dir.
            TMPDIR=str(self.run_dir / "tmp"),
            **(extra or {}),
        )
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def endpoints(self) -> dict[str, str]:
        return {"url": self.url, "openapi": self.url + "/openapi.json", "log": str(self.run_dir / "api.log")}

    def start(self) -> ApiProcess:
        self.proc = ManagedProcess(
            "beam-api",
            [str(Path(sys.executable).parent / "beam-api"), "serve", "--host", "127.0.0.1", "--port", str(self.port)],
            log_path=self.run_dir / "api.log",
            env=self.env,
        ).start()

        def ready() -> bool:
            with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                return r.status == 200

        self.proc.wait_ready(ready, timeout=60, what="serving")
        progress("beam-api", f"serving at {self.url}")
        return self

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def client(self, key: str | None) -> httpx.Client:
        return httpx.Client(base_url=self.url + "/api/v1/beam", headers={"X-API-Key": key} if key else {}, timeout=30)
