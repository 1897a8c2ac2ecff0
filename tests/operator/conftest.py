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
