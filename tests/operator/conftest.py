"""Fixtures for the operator on the local control plane."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from beam_devstack.operator_proc import helm_binary, install_chart_rbac

ROOT = Path(__file__).resolve().parents[2]
CRD = ROOT / "crds" / "beambackfills.yaml"


@pytest.fixture(scope="session")
def crd_installed(k8s):
    """The checked-in CRD, applied and Established."""
    from beam_devstack.operator_proc import install_crd

    install_crd(k8s)
    return yaml.safe_load(CRD.read_text())


# --- the real operator process, under the chart's RBAC -------------------------------------


@pytest.fixture(scope="session")
def helm():
    return helm_binary()


@pytest.fixture(scope="session")
def operator_kubeconfig(k8s, crd_installed, helm):
    return install_chart_rbac(k8s, helm, namespace="beam-operator-tests", release="optests")
