"""Fixtures for the operator on the local control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "beambackfills.yaml"


@pytest.fixture(scope="session")
def crd_installed(k8s):
    """The checked-in CRD, applied and Established."""
    k8s.kubectl("apply", "--server-side", "-f", str(CRD))
    k8s.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd/beambackfills.beam-backfill.dev")
    return yaml.safe_load(CRD.read_text())


# --- the real operator process, under the chart's RBAC -------------------------------------

import json
import os
import subprocess
import sys
import time

from beam_devstack.proc import ManagedProcess, free_port

OPERATOR_NS = "beam-system"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@pytest.fixture(scope="session")
def helm():
    out = subprocess.run(["bash", str(ROOT / "hack" / "get-helm.sh")], capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.fixture(scope="session")
def operator_kubeconfig(k8s, crd_installed, helm):
    """Apply the chart's ServiceAccount and RBAC (not its Deployment: the operator runs here as a
    process) and return a kubeconfig that authenticates as that ServiceAccount."""
    k8s.create_namespace(OPERATOR_NS)
    rendered = subprocess.run(
        [helm, "template", "beam", str(ROOT / "charts" / "beam-backfill"), "--namespace", OPERATOR_NS],
        capture_output=True, text=True, check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    sa = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    rbac = [d for d in docs if d["kind"] in RBAC_KINDS]
    k8s.kubectl("apply", "-f", "-", input="\n---\n".join(yaml.safe_dump(d) for d in rbac))
    return k8s.kubeconfig_for_service_account(OPERATOR_NS, sa, create=False)


class OperatorProcess:
    """`beam-operator` as a host process, configured as the chart would configure it."""

    def __init__(self, run_dir: Path, env: dict[str, str]) -> None:
        self.run_dir = run_dir
        self.env = env
        self.proc: ManagedProcess | None = None
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self.run_dir / f"operator-{self.starts}.log"

    def start(self) -> "OperatorProcess":
        self.starts += 1
        self.proc = ManagedProcess("operator", [str(Path(sys.executable).parent / "beam-operator")], log_path=self.log_path, env=self.env)
        self.proc.start()
        port = int(self.env["BEAM_LIVENESS_ENDPOINT"].split(":")[-1].split("/")[0])
        import urllib.request

        def live():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                return r.status == 200

        self.proc.wait_ready(live, timeout=60, what="live")
        return self

    def kill(self) -> None:
        """SIGKILL: no cleanup, as when a node dies."""
        import signal

        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.popen.wait(timeout=10)

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()

    def logs(self) -> str:
        return "\n".join((self.run_dir / f"operator-{i}.log").read_text(errors="replace") for i in range(1, self.starts + 1))


@pytest.fixture(scope="session")
def operator(k8s, node_agent, operator_kubeconfig, gcs, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("operator")
    env = dict(os.environ)
    env.update(
        KUBECONFIG=str(operator_kubeconfig),
        BEAM_JOBRUNNER_IMAGE="beam-backfill/standin-jobrunner:test",
        BEAM_GCS_ENDPOINT=gcs.endpoints()["url"],
        BEAM_STAGING_BUCKET="beam-staging",
        BEAM_METRICS_PORT=str(free_port()),
        BEAM_LIVENESS_ENDPOINT=f"http://127.0.0.1:{free_port()}/healthz",
        BEAM_JOB_TTL_SECONDS="600",
        BEAM_STANDIN_LOG=str(run_dir / "delivered.log"),
    )
    op = OperatorProcess(run_dir, env).start()
    yield op
    op.stop()


def get_bbf(k8s, ns, name):
    return k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills/{name}")


def wait_for(fn, timeout=60.0, what="condition", interval=0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def wait_status(k8s, ns, name, statuses, timeout=60.0):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    seen = []

    def check():
        st = (get_bbf(k8s, ns, name).get("status") or {})
        if not seen or seen[-1] != st.get("status"):
            seen.append(st.get("status"))
        return st if st.get("status") in statuses else None

    try:
        return wait_for(check, timeout, f"{ns}/{name} to be {statuses}")
    except AssertionError as e:
        raise AssertionError(f"{e}; statuses seen: {seen}") from None


def jobs_of(k8s, ns, uid, phase=None):
    sel = f"beam-backfill.dev/job-id={uid}" + (f",beam-backfill.dev/phase={phase}" if phase else "")
    import urllib.parse

    return k8s.api("GET", f"/apis/batch/v1/namespaces/{ns}/jobs?labelSelector={urllib.parse.quote(sel)}")["items"]
