"""The operator as a host process under the chart's RBAC, for the tests and the dev stack.

The chart's ServiceAccount, ClusterRole and bindings are applied for real (rendered by the
pinned helm); the Deployment is not, because no container runtime runs here. The operator then
authenticates with a token of that ServiceAccount, so it has exactly the chart's permissions.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import yaml

from beam_devstack.substrate.proc import ManagedProcess, free_port, progress

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "beam-backfill"
CRD = ROOT / "crds" / "beambackfills.yaml"
CRDS = ROOT / "crds"  # BeamBackfill and BeamPreview
OPERATOR_NS = "beam-system"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def helm_binary() -> str:
    out = subprocess.run(["bash", str(ROOT / "hack" / "get-helm.sh")], capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"hack/get-helm.sh failed: {out.stderr.strip()}")
    return out.stdout.strip()


def install_crd(k8s) -> None:
    k8s.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRDS))
    k8s.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/beambackfills.beam-backfill.dev",
        "crd/beampreviews.beam-backfill.dev",
    )


def install_chart_rbac(
    k8s, helm: str, namespace: str = OPERATOR_NS, release: str = "beam", values: tuple[str, ...] = ()
) -> Path:
    """Apply the chart's ServiceAccount and RBAC; return a kubeconfig for that ServiceAccount.

    Tests pass their own namespace and release, so their cluster-scoped ClusterRoles never
    collide with another test's `helm install` (or its uninstall)."""
    try:
        k8s.create_namespace(namespace)
    except Exception as e:  # already there (dev stack re-run)
        if "409" not in str(e) and "AlreadyExists" not in str(e):
            raise
    rendered = subprocess.run(
        [helm, "template", release, str(CHART), "--namespace", namespace, *values],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    k8s.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac))
    return k8s.kubeconfig_for_service_account(namespace, sa, create=False)


class OperatorProcess:
    """`beam-operator` as a host process, configured through BEAM_* env as the chart would."""

    def __init__(
        self,
        run_dir: Path,
        *,
        kubeconfig: Path,
        config: dict[str, str],
        detach: bool = False,
        pid_dir: Path | None = None,
        prefix: list[str] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        # A profiler to run the operator under, e.g. ["memray", "run", "-o", "op.bin"] (bench/scale.py).
        self.prefix = list(prefix or [])
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.env = dict(os.environ)
        self.env.update(
            KUBECONFIG=str(kubeconfig),
            BEAM_METRICS_PORT=str(self.metrics_port),
            BEAM_LIVENESS_ENDPOINT=f"http://127.0.0.1:{self.health_port}/healthz",
        )
        self.env.update(config)
        # The kubernetes client (the Lease) writes the kubeconfig's CA to a temporary file that
        # only an orderly exit removes: a killed operator (the fault tests) would leave it in /tmp.
        (self.run_dir / "tmp").mkdir(parents=True, exist_ok=True)
        self.env.setdefault("TMPDIR", str(self.run_dir / "tmp"))
        self.detach = detach
        self.pid_dir = pid_dir
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"operator-{self.starts}.log"

    def endpoints(self) -> dict[str, str]:
        return {"metrics": f"http://127.0.0.1:{self.metrics_port}/metrics", "log": str(self.log_path)}

    def start(self) -> OperatorProcess:
        self.starts += 1
        self.proc = ManagedProcess(
            "operator",
            [*self.prefix, str(Path(sys.executable).parent / "beam-operator")],
            log_path=self.log_path,
            env=self.env,
            detach=self.detach,
            pid_dir=self.pid_dir,
        )
        self.proc.start()

        def live() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=1) as r:
                return r.status == 200

        self.proc.wait_ready(live, timeout=60, what="live")
        progress("operator", f"running (log {self.log_path})")
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as when the operator's node dies."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def metrics(self) -> str:
        with urllib.request.urlopen(self.endpoints()["metrics"], timeout=5) as r:
            return r.read().decode()

    def logs(self) -> str:
        return "\n".join(
            (self.run_dir / f"operator-{i}.log").read_text(errors="replace") for i in range(1, self.starts + 1)
        )
