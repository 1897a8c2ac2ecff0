"""Fixtures for the chart tests: a pinned helm binary and a renderer that parses its output."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest
import yaml
from chartlib import REPO, Rendered, run_template


@pytest.fixture(scope="session")
def helm() -> str:
    """Path of helm, built from the Go module proxy by hack/get-helm.sh on first use (cached)."""
    proc = subprocess.run(
        ["bash", str(REPO / "hack" / "get-helm.sh")], stdout=subprocess.PIPE, stderr=sys.stderr, text=True, timeout=1800
    )
    assert proc.returncode == 0, "hack/get-helm.sh failed (its log is above)"
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def render(helm) -> Callable[..., Rendered]:
    """render(*helm_args) -> Rendered; fails the test with helm's stderr if helm fails."""

    def _render(*args: str, namespace: str = "beam-system") -> Rendered:
        proc = run_template(helm, *args, namespace=namespace)
        assert proc.returncode == 0, proc.stderr
        return Rendered(d for d in yaml.safe_load_all(proc.stdout) if d)

    return _render
