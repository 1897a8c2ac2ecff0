"""Every benchmark under bench/ runs here at a tiny size and writes its figures: an interface
change breaks the suite, not the next person who measures. Only that they run and report is
asserted; what the figures are is docs/benchmarks.md's business, measured alone on the machine.

The benchmarks that start a real node run before any test of the session has one (one node per
machine, beam_devstack.substrate.node): tests/conftest.py puts this module first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def bench(tmp_path: Path, script: str, *args: str, timeout: float = 600) -> dict:
    """Run `script` (a path under the repository) with `args`; its --json figures."""
    out = tmp_path / "figures.json"
    env = {**os.environ, "TMPDIR": str(tmp_path), "BEAM_DEVSTACK_DIR": str(tmp_path / "devstack")}
    try:
        p = subprocess.run(
            [sys.executable, str(ROOT / script), *args, "--json", str(out)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    finally:
        # A benchmark killed at the timeout cannot stop what it started in the background (its
        # node above all: one per machine); `beam-dev down` does, or the whole session's node
        # tests would find the machine taken.
        subprocess.run(
            [str(ROOT / ".venv" / "bin" / "beam-dev"), "down"], cwd=ROOT, env=env, capture_output=True, timeout=120
        )
    assert p.returncode == 0, f"{script} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return json.loads(out.read_text())


def test_transport_bench_runs(tmp_path):
    f = bench(
        tmp_path,
        "bench/transport.py",
        *("--rows", "20000", "--stage-rows", "5000", "--rounds", "1", "--warmup", "0", "--no-write"),
    )
    for key in (
        "ceiling",
        "ceiling_txn",
        "txn",
        "notxn",
        "ratio_txn",
        "ratio_notxn",
        "identity",
        "typical",
        "ratio_typical",
    ):
        med, lo, hi = f[key]
        assert 0 < lo <= med <= hi, (key, f[key])
    assert f["stage_fetch"] > 0 and f["encode_rate"] > 0


def test_js_engines_bench_runs(tmp_path):
    f = bench(tmp_path, "bench/js_engines.py", *("--rows", "2000", "--rounds", "1", "--no-write"))
    v8 = f["engines"]["v8"]
    assert v8["rows_per_s"]["identity"] > 0 and v8["rows_per_s"]["typical"] > 0 and v8["startup"]["import_s"] > 0
    assert v8["errors"]["thrown"] == "3:11" and v8["errors"]["syntax"] == "2:11", v8["errors"]
    assert set(v8["hostile"]) == {"alloc_2gb", "heap_grows", "typed_arrays", "infinite_loop", "recursion"}
    assert "require" not in v8["globals"]["present"] and "setTimeout" not in v8["globals"]["after_prelude"]
    assert f["engines"]["quickjs-ng"]["rows_per_s"]["typical"] > 0, "the dev group installs quickjs-ng"
    assert f["shipped"]["rows_per_s"]["typical"] > 0
    assert all(h["survived"] for h in f["shipped"]["hostile"].values()), f["shipped"]["hostile"]


def test_api_list_bench_runs(tmp_path):
    f = bench(tmp_path, "bench/api_list.py", "--backfills", "5", "--requests", "5", "--no-write")
    assert f["backfills"] == 5 and f["api_ms"]["p50"] > 0 and f["apiserver_ms"]["p99"] > 0


@pytest.mark.node
def test_scale_bench_runs(tmp_path):
    f = bench(
        tmp_path,
        "bench/scale.py",
        *("--backfills", "4", "--namespaces", "2", "--chunks", "2", "--parallelism", "2", "--timeout", "300"),
        "--run-dir",
        str(tmp_path / "run"),
        timeout=900,
    )
    assert f["stuck_count"] == 0 and f["final_status"] == {"completed": 4}, f
    assert f["latency_apply_to_staging_job_s"]["n"] == 4 and f["latency_apply_to_staging_job_s"]["p50"] > 0, f
    parts = f["apply_to_staging_job_parts_s"]
    assert {k: v["n"] for k, v in parts.items()} == {"until_finalizer": 4, "finalizer": 4, "until_job": 4, "job": 4}, f


@pytest.mark.node
def test_e2e_bench_runs(tmp_path):
    f = bench(
        tmp_path,
        "bench/e2e.py",
        *("--rows", "20000", "--rounds", "1", "--chunk-bytes", "1048576", "--stage-rounds", "1"),
        timeout=1200,
    )
    [run] = f["backfills"]
    assert run["exactly_once"] and run["pods"]["staging"] == 1 and run["pods"]["transport"] >= 1, run
    assert set(f["staging"]["median"]) == {"host", "container"} and f["staging"]["ratio"] > 0, f["staging"]


def test_the_run_context_the_benchmarks_print_names_cores_python_and_load():
    # transport.py and js_engines.py print it only when they write docs/benchmarks.md, which
    # their smoke runs above do not (--no-write): run it here, as they import it.
    done = subprocess.run(
        [sys.executable, "-c", "from run_context import machine; print(machine())"],
        cwd=ROOT / "bench",
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"{os.cpu_count()} cores (") and "Python 3." in line and "load average " in line, line
