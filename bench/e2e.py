#!/usr/bin/env python3
"""Benchmark: the product end to end on the real node, and staging in a container against the
same staging as a host process (issue 24).

    .venv/bin/python bench/e2e.py                         # 3 rounds per chunk size, 3 staging rounds
    .venv/bin/python bench/e2e.py --rounds 1 --stage-rounds 1 --rows 20000 --json out.json   # a smoke run

On the local stack (beam-dev up: control plane, a real node, Kafka, GCS, fakesnow; started if it
is not up, and stopped again at the end if this run started it), with the demo's dataset and the
chart as `hack/demo` installs it:

1. the demo's backfill (examples/seed-usdc-base.yaml), `--rounds` times for each of
   `--chunk-bytes` (the demo's 4 MiB chunks and production's 64 MiB): apply -> completed, the
   time inside worker processes and outside them (Pod start-up, operator reaction), Pods created,
   exactly once (every row once in Kafka, read_committed);
2. `beam-jobrunner stage` of the same window, `--stage-rounds` times as a host process and as the
   operator's staging Job on the node, alternating which goes first: the worker's own timings from
   its log (start-up, Snowflake login, query, the whole staging), and for the container what it
   costs before the process starts.

Prints a table per part; --json writes every figure. Staged files of part 2 are deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-usdc-base.yaml"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} bench] {msg}", file=sys.stderr, flush=True)


# --- part 1: the demo's backfill -------------------------------------------------------------


def backfills(state, kube, chunk_bytes: list[int], rounds: int) -> list[dict]:
    import yaml

    from beam_devstack import demo

    doc = yaml.safe_load(SEED.read_text())
    out = []
    for size in chunk_bytes:
        demo.install_operator(state, kube, chunk_target_bytes=size)
        for r in range(rounds):
            # A topic per run: each count is of that run's messages alone.
            run = json.loads(json.dumps(doc))
            run["metadata"]["name"] = f"bench-{size // 2**20}mib-{r}"
            kafka = next(d for d in run["spec"]["destinations"] if d["type"] == "kafka")
            kafka["name"] = f"bench-{uuid.uuid4().hex[:8]}"
            res = demo.run_backfill(state, kube, run, say=lambda *_: None)
            fig = {"chunk_target_bytes": size, "round": r, **res.figures()}
            say(
                f"{size // 2**20} MiB chunks, round {r}: {res.status} in {res.elapsed:.1f}s, outside the jobrunner "
                f"{res.outside:.1f}s ({fig['outside_share']:.0%}), pods {fig['pods']}, exactly once {res.exactly_once}"
            )
            out.append(fig)
            kube.kubectl("delete", "bbf", run["metadata"]["name"], "-n", demo.NAMESPACE, "--wait=true")
    return out


# --- part 2: staging in a container against a host process ------------------------------------


def _log_time(line: dict) -> float:
    return datetime.strptime(line["time"], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def worker_timings(log_text: str) -> dict:
    """The staging worker's own figures, from its JSON log lines (beam_contract.logs)."""
    import re

    lines = []
    for raw in log_text.splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict) and "message" in doc and "time" in doc:
            lines.append(doc)
    if not lines:
        raise RuntimeError(f"no JSON log lines in the worker's output: {log_text[-2000:]}")
    found: dict[str, float] = {}
    patterns = {
        "startup": r"started ([0-9.]+)s after the process",
        "login": r"connected to Snowflake in ([0-9.]+)s",
        "query": r"Snowflake answered in ([0-9.]+)s",
        "staging": r"staged \d+ rows in \d+ chunks \(\d+ bytes\) in ([0-9.]+)s",
    }
    for line in lines:
        for key, pat in patterns.items():
            if m := re.search(pat, line["message"]):
                found[key] = float(m.group(1))
    missing = set(patterns) - set(found)
    if missing:
        raise RuntimeError(f"the worker's log lacks {sorted(missing)}: {log_text[-2000:]}")
    # From the process's creation to its last line: what the worker itself takes.
    found["worker"] = found["startup"] + (_log_time(lines[-1]) - _log_time(lines[0]))
    return found


def staging_env(state, kube, staging_uri: str) -> tuple[dict, list[dict]]:
    """The staging Job the operator would create for the demo's backfill, and the same env for a
    host process (Secret references resolved, as the kubelet resolves them)."""
    import base64

    import yaml

    from beam_contract.model import BackfillSpec
    from beam_devstack import demo
    from beam_operator import child_jobs
    from beam_operator.config import OperatorConfig

    values = demo.chart_values(state)
    config = OperatorConfig(
        **values["config"],
        jobrunner_image=f"{values['jobrunner']['image']['repository']}:{values['jobrunner']['image']['tag']}",
        image_pull_policy="Never",
    )
    spec = BackfillSpec.model_validate(yaml.safe_load(SEED.read_text())["spec"])
    uid = str(uuid.uuid4())
    job = child_jobs.staging_job("bench-stage", demo.NAMESPACE, uid, spec, config)
    # The backfill's staged-data key, as the operator makes it (without an owner: no backfill
    # here), so that both ways seal their chunks alike.
    staged_key = base64.b64encode(os.urandom(32)).decode()
    key_secret = child_jobs.staging_key_secret("bench-stage", demo.NAMESPACE, uid)
    key_secret["metadata"].pop("ownerReferences")
    key_secret["stringData"] = {child_jobs.STAGING_KEY_SECRET_KEY: staged_key}
    kube.kubectl("create", "-n", demo.NAMESPACE, "-f", "-", input=json.dumps(key_secret))
    secret = kube.core.read_namespaced_secret(demo.SNOWFLAKE_SECRET, demo.NAMESPACE).data
    env = {}
    container = job["spec"]["template"]["spec"]["containers"][0]
    for e in container["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        elif e["valueFrom"]["secretKeyRef"]["name"] == key_secret["metadata"]["name"]:
            env[e["name"]] = staged_key
        elif (key := e["valueFrom"]["secretKeyRef"]["key"]) in secret:
            env[e["name"]] = base64.b64decode(secret[key]).decode()
    env["BEAM_STAGING_URI"] = staging_uri
    for e in container["env"]:
        if e["name"] == "BEAM_STAGING_URI":
            e["value"] = staging_uri
    return env, job


def stage_on_host(env: dict, run_dir: Path) -> dict:
    term = run_dir / f"termination-{uuid.uuid4().hex[:6]}"
    full = {
        "PATH": os.environ["PATH"],
        "HOME": os.environ.get("HOME", "/root"),
        "TMPDIR": str(run_dir),
        "BEAM_LOG_FORMAT": "json",
        "TERMINATION_MESSAGE_PATH": str(term),
        **env,
    }
    t0 = time.monotonic()
    p = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "beam-jobrunner"), "stage"], env=full, capture_output=True, text=True, timeout=600
    )
    wall = time.monotonic() - t0
    if p.returncode != 0:
        raise RuntimeError(f"host staging failed ({p.returncode}): {p.stderr[-2000:]}")
    return {"wall": wall, **worker_timings(p.stderr)}


def stage_in_container(kube, job: dict, n: int) -> dict:
    from beam_devstack import demo

    job = json.loads(json.dumps(job))
    name = f"bench-stage-{n}-{uuid.uuid4().hex[:5]}"
    job["metadata"]["name"] = name
    job["metadata"].pop("ownerReferences")  # no backfill owns it: the garbage collector would take it
    t0 = time.monotonic()
    kube.kubectl("create", "-n", demo.NAMESPACE, "-f", "-", input=json.dumps(job))
    deadline = time.monotonic() + 600
    while True:
        st = kube.kubectl("get", "job", name, "-n", demo.NAMESPACE, "-o", "json").stdout
        conds = {
            c["type"] for c in (json.loads(st).get("status") or {}).get("conditions") or [] if c["status"] == "True"
        }
        if conds & {"Complete", "SuccessCriteriaMet"}:
            break
        if conds & {"Failed", "FailureTarget"} or time.monotonic() > deadline:
            raise RuntimeError(f"the staging Job did not complete: {st[-2000:]}")
        pods = kube.core.list_namespaced_pod(demo.NAMESPACE, label_selector=f"job-name={name}").items
        for cs in (cs for p in pods for cs in (p.status.container_statuses or [])):
            waiting = cs.state.waiting
            if waiting is not None and waiting.reason in ("CreateContainerConfigError", "ErrImageNeverPull"):
                raise RuntimeError(f"the staging Pod cannot start: {waiting.reason}: {waiting.message}")
        time.sleep(0.2)
    wall = time.monotonic() - t0
    [pod] = kube.core.list_namespaced_pod(demo.NAMESPACE, label_selector=f"job-name={name}").items
    log = kube.core.read_namespaced_pod_log(pod.metadata.name, demo.NAMESPACE)
    [cs] = pod.status.container_statuses
    started = cs.state.terminated.started_at.timestamp()
    figures = {
        "wall": wall,
        # Before the process runs: scheduling, the sandbox, the container (1 s resolution).
        "pod_start": started - pod.metadata.creation_timestamp.timestamp(),
        **worker_timings(log),
    }
    kube.kubectl("delete", "job", name, "-n", demo.NAMESPACE, "--wait=false", "--cascade=foreground")
    return figures


def staging(state, kube, rounds: int, run_dir: Path) -> dict:
    from beam_contract import staging as layout
    from beam_devstack import demo
    from beam_operator import staged_files

    os.environ["STORAGE_EMULATOR_HOST"] = state["components"]["gcs"]["url"]
    runs: dict[str, list[dict]] = {"host": [], "container": []}
    uris = []
    try:
        for r in range(rounds):
            order = ("host", "container") if r % 2 == 0 else ("container", "host")
            for where in order:
                uri = layout.job_staging_uri(demo.BUCKET, "bench", demo.NAMESPACE, str(uuid.uuid4()))
                uris.append(uri)
                env, job = staging_env(state, kube, uri)
                fig = stage_on_host(env, run_dir) if where == "host" else stage_in_container(kube, job, r)
                runs[where].append(fig)
                say(
                    f"staging round {r} {where}: the worker {fig['worker']:.2f}s (start-up {fig['startup']:.2f}s, "
                    f"login {fig['login']:.2f}s, query {fig['query']:.2f}s, staging {fig['staging']:.2f}s)"
                    + (f", Pod start {fig['pod_start']:.0f}s" if "pod_start" in fig else "")
                )
    finally:
        for uri in uris:
            staged_files.delete_staged(uri)
    med = {w: {k: statistics.median(f[k] for f in figs) for k in figs[0]} for w, figs in runs.items() if figs}
    return {"rounds": runs, "median": med, "ratio": med["container"]["worker"] / med["host"]["worker"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="the demo dataset's rows")
    ap.add_argument("--rounds", type=int, default=3, help="backfills per chunk size")
    ap.add_argument(
        "--chunk-bytes",
        default=f"{4 * 2**20},{64 * 2**20}",
        help="comma-separated chunk_target_bytes to run the backfill with (the demo's, production's)",
    )
    ap.add_argument("--stage-rounds", type=int, default=3, help="staging runs as a host process and in a container")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    from beam_devstack import cli, demo

    started = not (cli.load_state() and cli._all_alive())
    run_dir = Path(tempfile.mkdtemp(prefix="beam-e2e-"))
    try:
        state, kube = demo.prepare(args.rows)
        figures: dict = {"rows": args.rows}
        figures["backfills"] = backfills(state, kube, [int(b) for b in args.chunk_bytes.split(",")], args.rounds)
        figures["staging"] = staging(state, kube, args.stage_rounds, run_dir)
    finally:
        if started:
            cli.down()
        import shutil

        shutil.rmtree(run_dir, ignore_errors=True)

    print(
        "\n| chunk_target_bytes | apply -> completed | outside the jobrunner | Pods (staging + transport) | exactly once |"
    )
    print("|---|---|---|---|---|")
    for f in figures["backfills"]:
        pods = f["pods"] or {}
        print(
            f"| {f['chunk_target_bytes'] // 2**20} MiB | {f['seconds']:.1f} s | {f['outside_seconds']:.1f} s "
            f"({f['outside_share']:.0%}) | {pods.get('staging', 0)} + {pods.get('transport', 0)} | {f['exactly_once']} |"
        )
    med = figures["staging"]["median"]
    print("\n| staging (median) | the worker | start-up | Snowflake login | query | staging | Pod start |")
    print("|---|---|---|---|---|---|---|")
    for where in ("host", "container"):
        m = med[where]
        pod = f"{m['pod_start']:.0f} s" if "pod_start" in m else ""
        print(
            f"| {where} | {m['worker']:.2f} s | {m['startup']:.2f} s | {m['login']:.2f} s | {m['query']:.2f} s | "
            f"{m['staging']:.2f} s | {pod} |"
        )
    print(f"\ncontainer / host, the worker's time: {figures['staging']['ratio']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    bad = [f for f in figures["backfills"] if not f["exactly_once"]]
    if bad:
        raise SystemExit(f"not exactly once: {bad}")


if __name__ == "__main__":
    main()
