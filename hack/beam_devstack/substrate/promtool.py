"""Prometheus' promtool, built from the Go module proxy and cached (hack/get-promtool.sh): what
checks and unit-tests the chart's alerting rules (tests/chart/test_monitoring.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def promtool_binary() -> str:
    # stderr not captured: the first build takes about 5 minutes, and its progress lines say so.
    out = subprocess.run(
        ["bash", str(ROOT / "hack" / "get-promtool.sh")], stdout=subprocess.PIPE, text=True, timeout=1800
    )
    if out.returncode != 0:
        raise RuntimeError("hack/get-promtool.sh failed (its messages are above)")
    return out.stdout.strip()
