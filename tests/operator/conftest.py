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
    from beam_devstack.operator_proc import install_crd

    install_crd(k8s)
    return yaml.safe_load(CRD.read_text())


# --- the real operator process, under the chart's RBAC -------------------------------------

import time

from beam_devstack.operator_proc import OperatorProcess, helm_binary, install_chart_rbac


@pytest.fixture(scope="session")
def helm():
    return helm_binary()


@pytest.fixture(scope="session")
def operator_kubeconfig(k8s, crd_installed, helm):
    return install_chart_rbac(k8s, helm, namespace="beam-operator-tests", release="optests")


@pytest.fixture(scope="module")
def operator(k8s, node_agent, operator_kubeconfig, gcs, tmp_path_factory):
    """The operator for this module's tests. Module scope: two operators on one cluster would
    both reconcile every BeamBackfill, so each test module that runs one stops it when done."""
    run_dir = tmp_path_factory.mktemp("operator")
    op = OperatorProcess(
        run_dir,
        kubeconfig=operator_kubeconfig,
        config={
            "BEAM_JOBRUNNER_IMAGE": "beam-backfill/standin-jobrunner:test",
            "BEAM_GCS_ENDPOINT": gcs.endpoints()["url"],
            "BEAM_STAGING_BUCKET": "beam-staging",
            "BEAM_JOB_TTL_SECONDS": "600",
        },
    ).start()
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
