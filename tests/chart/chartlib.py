"""Helpers shared by the chart tests: where the chart is, and running `helm template`."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "beam-backfill"
FULL_VALUES = Path(__file__).with_name("full-values.yaml")


class Rendered(list):
    """The documents of one `helm template`, with lookups by kind and name."""

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self if d["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [d for d in self.of(kind) if name is None or d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {[d['metadata']['name'] for d in found]}"
        return found[0]


def run_template(helm: str, *args: str, namespace: str = "beam-system") -> subprocess.CompletedProcess:
    return subprocess.run(
        [helm, "template", "beam", str(CHART), "--namespace", namespace, "--include-crds", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def container_env(deployment: dict[str, Any]) -> dict[str, str]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e["value"] for e in container["env"] if "value" in e}
