#!/usr/bin/env python3
"""The operator at scale: many live BeamBackfills on the local control plane (issue 7).

    .venv/bin/python bench/scale.py                              # 500 backfills x 2 chunks, 10 namespaces
    .venv/bin/python bench/scale.py --backfills 50 --chunks 2    # a quick run
    .venv/bin/python bench/scale.py --restart-apiserver-at 0.3 --restart-operator-at 0.6

What runs: etcd, kube-apiserver (with an audit log of the operator's requests and BeamBackfill creates),
kube-controller-manager, the stack's real node (kube-scheduler, containerd, kubelet, kube-proxy:
beam_devstack.substrate.node, on a bridge of its own), fake-gcs-server, and the real operator
process under the chart's RBAC, on the host, so that /proc gives its RSS and CPU and a profiler can wrap it.
Workers are containers of bench/scale_standin (its Dockerfile, built like the project's images):
a sh script that sleeps briefly and keeps the worker contract, so that the operator, not Python
start-ups of thousands of workers, is what is measured. Every Pod is a real container, so the
node's Pod throughput bounds the scale: the defaults are 500 backfills x 2 chunks (1,500 Pods).
Everything is stopped at the end.

What it reports (docs/benchmarks.md, "Operator at scale", explains how to read it):
- latency apply -> staging Job created, and transport Job finished -> `completed` written,
  p50/p99, both timed by the benchmark's own watches; the first also on the apiserver's clock
  (audit log: BeamBackfill create received -> staging Job create answered), which no watch lag
  inflates;
- the operator's peak RSS (VmHWM) and CPU seconds (utime + stime), summed over restarts;
- the operator's API requests (from the audit log) as reads, writes and watches per backfill,
  and its status patches per backfill (total, per minute of life, most in any 1 s);
- total time until every backfill is completed, and any that got stuck;
- with --restart-*: whether every backfill still completed, Jobs per backfill (duplicates),
  and how soon the operator wrote again after kube-apiserver came back.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import scale_probe  # noqa: E402
from scale_audit import POLICY, READS, WATCHES, WRITES, max_in_window, read_audit  # noqa: E402
from scale_watch import Client, Watcher, admin_ssl  # noqa: E402

from beam_contract.model import Phase  # noqa: E402
from beam_devstack import images  # noqa: E402
from beam_devstack.operator_proc import OperatorProcess, helm_binary, install_chart_rbac, install_crd  # noqa: E402
from beam_devstack.substrate.gcs import FakeGcs  # noqa: E402
from beam_devstack.substrate.k8s import K8S_VERSION, SERVICE_CIDR, ControlPlane  # noqa: E402
from beam_devstack.substrate.node import Node, NodeSettings  # noqa: E402
from beam_devstack.substrate.proc import progress  # noqa: E402

STANDIN = images.ProjectImage(
    "scale-standin", BENCH / "scale_standin" / "Dockerfile", "beam-backfill/scale-standin", BENCH / "scale_standin"
)
# A bridge and ranges of the benchmark's own (the suite uses 10.213.9.0/24, the demo 10.213.8.0/24).
NODE = {"bridge": "beambench0", "node_ip": "10.213.10.1", "pod_cidr": "10.213.10.0/24"}
TERMINAL = tuple(p.value for p in Phase if p.terminal)


def say(msg: str) -> None:
    progress("scale", msg)


class AuditedControlPlane(ControlPlane):
    """The dev stack's control plane plus an audit log of the operator's requests."""

    job_syncs = 50

    @property
    def audit_log(self) -> Path:
        return self.run_dir / "audit" / "audit.log"

    def _proc(self, name: str, argv: list[str]):
        if name == "kube-controller-manager":
            # 5 Job syncs at a time (the default) kept ~20 of 4,000 runnable Pods in flight at
            # 1,000 Jobs: the benchmark measured the Job controller, not the operator.
            argv = [*argv, f"--concurrent-job-syncs={self.job_syncs}"]
        return super()._proc(name, argv)

    def _start_apiserver(self) -> None:
        self.apiserver_started_at = time.time()  # a restart's recovery counts from here
        super()._start_apiserver()

    def _apiserver_argv(self) -> list[str]:
        policy = self.run_dir / "audit" / "policy.yaml"
        policy.parent.mkdir(parents=True, exist_ok=True)
        policy.write_text(POLICY)
        return super()._apiserver_argv() + [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
        ]


def proc_usage(pid: int) -> dict[str, float]:
    """Peak and current RSS (MB) and CPU seconds of a live process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            fields[k] = int(v.split()[0]) / 1024
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return {"hwm_mb": fields["VmHWM"], "rss_mb": fields["VmRSS"], "cpu_s": (int(stat[11]) + int(stat[12])) / ticks}


def open_sockets(pid: int) -> int:
    """Sockets the process holds: its API connections (kopf's pool, the controller's) and watches."""
    n = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            n += os.readlink(fd).startswith("socket:")
        except OSError:
            pass  # closed meanwhile
    return n


def probe_census(pid: int, when: str) -> dict | None:
    found = scale_probe.census(pid)
    if found is None:
        say(f"--probe: no census {when} (gdb could not run Python in the operator)")
    else:
        say(
            f"--probe {when}: {found['objects']} Python objects, {found['bodies']} Kubernetes bodies, "
            f"{found['JobObs']} JobObs; most: {found['types'][:6]}"
        )
    return found


def wait_quiet(pid: int, still_s: float = 35, at_most_s: float = 120) -> tuple[float, int]:
    """Until the process's socket count has not moved for `still_s` (its pooled connections
    closed once idle: aiohttp's keep-alive is 15 s, checked every 15 s; each holds 256 KiB of TLS buffers), or
    `at_most_s`: an observable point, not a sleep. Returns the seconds waited and the count."""
    t0 = time.time()
    last, since = open_sockets(pid), time.time()
    while time.time() - since < still_s and time.time() - t0 < at_most_s:
        time.sleep(1)
        if (n := open_sockets(pid)) != last:
            last, since = n, time.time()
    return time.time() - t0, last


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN when there is nothing to rank."""
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, max(0, int(round(p / 100 * len(v) + 0.5)) - 1))]


def manifest(name: str, chunks: int, parallelism: int, ttl: int | None = None) -> dict:
    extra = {} if ttl is None else {"ttl_seconds_after_finished": ttl}
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": name},
        "spec": {
            "job_name": f"scale benchmark {name}",
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {"partition_key": "block", "start": 0, "end": chunks},
            "destinations": [{"type": "kafka", "name": "scale-bench"}],
            "parallelism": parallelism,
            **extra,
        },
    }


class Operator:
    """The operator process plus the usage of every incarnation of it (restarts add up)."""

    def __init__(self, op: OperatorProcess) -> None:
        self.op = op
        self.finished: list[dict[str, float]] = []
        self.pids: list[int] = []

    def start(self) -> None:
        self.started_at = time.time()
        self.op.start()
        self.pids.append(self.op.proc.pid)

    def usage(self) -> dict[str, float]:
        now = (
            proc_usage(self.op.proc.pid)
            if self.op.proc and self.op.proc.alive()
            else {"hwm_mb": 0, "rss_mb": 0, "cpu_s": 0}
        )
        return {
            "hwm_mb": max([now["hwm_mb"]] + [u["hwm_mb"] for u in self.finished]),
            "rss_mb": now["rss_mb"],
            "cpu_s": now["cpu_s"] + sum(u["cpu_s"] for u in self.finished),
        }

    def kill_and_restart(self) -> None:
        self.finished.append(proc_usage(self.op.proc.pid))
        self.op.kill()
        self.start()

    def stop(self) -> None:
        if self.op.proc and self.op.proc.alive():
            self.finished.append(proc_usage(self.op.proc.pid))
        self.op.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backfills", type=int, default=500)
    ap.add_argument("--namespaces", type=int, default=10)
    ap.add_argument("--chunks", type=int, default=2, help="chunks per backfill (transport Pods)")
    ap.add_argument("--parallelism", type=int, default=4, help="spec.parallelism of each backfill")
    ap.add_argument("--sleep", type=float, default=0.1, help="seconds the stand-in worker sleeps per Pod")
    ap.add_argument("--create-workers", type=int, default=8, help="concurrent creates")
    ap.add_argument(
        "--create-rate",
        type=float,
        default=0.0,
        help="creates per second in all (default 0: as fast as the apiserver takes them, a burst)",
    )
    ap.add_argument(
        "--restart-apiserver-at",
        type=float,
        help="restart kube-apiserver when this fraction of all chunks is delivered",
    )
    ap.add_argument(
        "--restart-operator-at",
        type=float,
        help="SIGKILL and restart the operator when this fraction of all chunks is delivered",
    )
    ap.add_argument(
        "--expire",
        action="store_true",
        help="once every backfill has ended, set spec.ttl_seconds_after_finished to 0 on all of them, wait until "
        "the operator has deleted them all, and report its RSS before any backfill, with all of them finished, "
        "and after they expired",
    )
    ap.add_argument(
        "--probe",
        action="store_true",
        help="with --expire: look inside the operator through gdb (bench/scale_probe.py), with all ended and after "
        "expiry: its Python objects and the Kubernetes bodies among them, then its RSS after malloc_trim(0)",
    )
    ap.add_argument("--job-syncs", type=int, default=50, help="kube-controller-manager --concurrent-job-syncs")
    ap.add_argument("--operator-env", action="append", default=[], metavar="BEAM_X=V", help="extra operator setting")
    ap.add_argument(
        "--operator-prefix",
        default="",
        metavar="CMD",
        help="run the operator under this command, e.g. 'memray run --native -o /tmp/op.bin' or 'py-spy record -o /tmp/op.svg --' "
        "(the RSS and CPU figures then include the profiler's)",
    )
    ap.add_argument(
        "--timeout", type=float, default=3 * 3600, help="give up (and report the stuck ones) after this many seconds"
    )
    ap.add_argument("--progress-every", type=float, default=5.0)
    ap.add_argument("--run-dir", type=Path, help="keep logs here (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()
    # SIGTERM (timeout, a Ctrl-C'd flock) must stop the node and delete the run dir like an error does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="beam-scale-"))
    run_dir.mkdir(parents=True, exist_ok=True)
    say(f"run dir {run_dir}")
    archives = [*images.ensure_built(), STANDIN.archive()]
    settings = NodeSettings(state_dir=run_dir / "node", service_cidr=SERVICE_CIDR, images=archives, **NODE)
    node = Node(settings)
    plane = AuditedControlPlane(run_dir / "k8s", node_ip=settings.node_ip)
    plane.job_syncs = args.job_syncs
    gcs = FakeGcs(run_dir)
    operator = None
    figures = None
    try:
        node.prepare_network()
        plane.start()
        node.join(plane)
        gcs.start()
        install_crd(plane)
        kubeconfig = install_chart_rbac(plane, helm_binary())
        config = {
            "BEAM_JOBRUNNER_IMAGE": STANDIN.reference(),
            "BEAM_IMAGE_PULL_POLICY": "Never",
            # The stand-in sleeps 0.1 s: without requests, as before the default, so that the
            # node fits as many at once and the figures stay comparable (docs/benchmarks.md).
            "BEAM_WORKER_RESOURCES": "{}",
            "BEAM_WORKER_ENV": json.dumps({"SCALE_CHUNKS": str(args.chunks), "SCALE_SLEEP": str(args.sleep)}),
            "BEAM_GCS_ENDPOINT": gcs.endpoints()["url"],
            "BEAM_STAGING_BUCKET": "beam-staging",
        }
        config.update(kv.split("=", 1) for kv in args.operator_env)
        operator = Operator(
            OperatorProcess(
                run_dir / "operator", kubeconfig=kubeconfig, config=config, prefix=shlex.split(args.operator_prefix)
            )
        )
        operator.start()
        namespaces = [f"scale-{i}" for i in range(args.namespaces)]
        for ns in namespaces:
            plane.create_namespace(ns)
        others = {
            "kube-apiserver": plane.apiserver,
            "etcd": plane.etcd,
            "kube-controller-manager": plane.controller_manager,
            **node.procs,
        }
        figures = run(args, plane, operator, namespaces, run_dir, others)
    finally:
        stops = [operator.stop] if operator else []
        for stop in (*stops, node.stop_workloads, gcs.stop, plane.stop, node.stop):
            try:
                stop()
            except Exception as e:  # keep stopping the others
                say(f"{stop.__qualname__}: {e}")
        if not args.run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
    report(figures, args)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
        say(f"wrote {args.json}")


def wait_watching(plane: AuditedControlPlane, since: float, timeout: float = 60) -> None:
    """Until the operator has watches open on backfills and Jobs (it may have retried a 429
    while a fresh CRD's storage initializes): latency counts from a ready operator."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        watching = {r for t, v, r, c in read_audit(plane.audit_log, since).times if v == "watch" and c == 200}
        if {"beambackfills", "jobs"} <= watching:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the operator is not watching after {timeout:.0f}s")


def run(
    args, plane: AuditedControlPlane, operator: Operator, namespaces: list[str], run_dir: Path, others: dict
) -> dict:
    ctx = admin_ssl(plane.pki)
    watcher = Watcher(plane.port, ctx, host=NODE["node_ip"]).start()
    wait_watching(plane, operator.started_at)
    watcher.ready.wait(30)
    names = [(namespaces[i % len(namespaces)], f"bf-{i:05d}") for i in range(args.backfills)]
    rss_baseline = operator.usage()["rss_mb"]  # started and watching, no backfill yet
    sent: dict[tuple[str, str], float] = {}
    local = threading.local()
    errors: Counter = Counter()

    def create(key: tuple[str, str], at: float) -> None:
        if at > time.time():
            time.sleep(at - time.time())
        if not hasattr(local, "client"):
            local.client = Client(plane.port, ctx, host=NODE["node_ip"])
        ns, name = key
        while True:
            sent[key] = time.time()
            try:
                code, body = local.client.request(
                    "POST",
                    f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills",
                    manifest(name, args.chunks, args.parallelism),
                )
            except OSError as e:  # the apiserver restarting: try again
                errors[type(e).__name__] += 1
                time.sleep(0.5)
                continue
            if code in (201, 409):
                return
            errors[f"HTTP {code}"] += 1
            time.sleep(0.5)

    t0 = time.time()
    say(
        f"creating {args.backfills} backfills x {args.chunks} chunks in {len(namespaces)} namespaces ({args.create_workers} at a time)"
    )
    pool = ThreadPoolExecutor(args.create_workers)
    futures = [
        pool.submit(create, k, t0 + (i / args.create_rate if args.create_rate else 0)) for i, k in enumerate(names)
    ]
    restarts: dict[str, dict[str, float]] = {}
    last_progress = 0.0
    deadline = t0 + args.timeout
    while True:
        time.sleep(0.5)
        with watcher.lock:
            by_status = Counter(b.status or "pending" for b in watcher.backfills.values())
            chunks_done = sum(
                args.chunks - (b.chunks_left if b.chunks_left is not None else args.chunks)
                for b in watcher.backfills.values()
                if b.status in ("transporting", "completed")
            )
            jobs = len(watcher.jobs)
        done = sum(by_status[s] for s in TERMINAL)
        created = sum(f.done() for f in futures)
        now = time.time()
        if now - last_progress >= args.progress_every:
            last_progress = now
            u = operator.usage()
            counts = " ".join(
                f"{s}={by_status[s]}" for s in ("pending", "staging", "transporting", *TERMINAL) if by_status[s]
            )
            say(
                f"{now - t0:7.1f}s created {created}/{args.backfills} | {counts} | jobs {jobs} chunks {chunks_done}/{args.backfills * args.chunks} | operator rss {u['rss_mb']:.0f} MB cpu {u['cpu_s']:.0f}s"
            )
        if created == args.backfills and done == args.backfills:
            break
        if now > deadline:
            say(f"timeout after {args.timeout:.0f}s")
            break
        # Chunks, not completed backfills: backfills finish in waves, chunks steadily.
        frac = chunks_done / (args.backfills * args.chunks)
        if args.restart_apiserver_at is not None and "apiserver" not in restarts and frac >= args.restart_apiserver_at:
            say(
                f"restarting kube-apiserver at {chunks_done} chunks delivered, {by_status['completed']} backfills completed"
            )
            r0 = time.time()
            plane.restart_apiserver()
            restarts["apiserver"] = {
                "at": r0,
                "started": plane.apiserver_started_at,
                "back": time.time(),
                "completed_before": by_status["completed"],
                "operator_pid": operator.pids[-1],
            }
            say(
                f"kube-apiserver back after {time.time() - r0:.1f}s; the operator keeps running (pid {operator.pids[-1]})"
            )
        if args.restart_operator_at is not None and "operator" not in restarts and frac >= args.restart_operator_at:
            say(
                f"SIGKILL of the operator at {chunks_done} chunks delivered, {by_status['completed']} backfills completed, then a new one"
            )
            r0 = time.time()
            operator.kill_and_restart()
            restarts["operator"] = {"at": r0, "back": time.time(), "completed_before": by_status["completed"]}
    t_end = time.time()
    pool.shutdown(wait=False, cancel_futures=True)
    usage = operator.usage()
    expiry = None
    if args.expire:
        expiry = expire_all(args, plane, ctx, watcher, operator, names, rss_baseline, deadline)
    # The rest of the machine's CPU, to read the operator's figures against (2 cores shared).
    cpu_others = {}
    for what, p in others.items():
        try:
            cpu_others[what] = round(proc_usage(p.pid)["cpu_s"], 1)
        except (OSError, AssertionError):
            pass
    if "apiserver" in restarts:
        cpu_others["kube-apiserver"] = f"{cpu_others.get('kube-apiserver')} (since its restart)"
    try:
        metrics_text = operator.op.metrics()
    except OSError:
        metrics_text = ""
    operator.stop()  # nothing more in the audit log after this
    watcher.stop()
    figures = figures_from(
        args, plane, watcher, sent, names, t0, t_end, usage, metrics_text, restarts, errors, operator
    )
    figures["cpu_s_of_other_processes"] = cpu_others
    figures["expiry"] = expiry
    return figures


def expire_all(args, plane, ctx, watcher, operator, names, rss_baseline, deadline) -> dict:
    """--expire: every finished backfill's ttl set to 0 at once (the field may change), then until
    the operator has deleted them all; its RSS then, once quiet, against its RSS before any
    backfill existed and with all of them finished (also once quiet)."""
    pid = operator.op.proc.pid
    quiet_completed_s, sockets_completed = wait_quiet(pid)
    rss_completed = operator.usage()["rss_mb"]
    census_completed = probe_census(pid, "all ended") if args.probe else None
    say(
        f"all {len(names)} ended; quiet after {quiet_completed_s:.0f}s: operator rss {rss_completed:.0f} MB, "
        f"{sockets_completed} sockets; setting ttl_seconds_after_finished 0 on each"
    )
    local = threading.local()

    def expire(key: tuple[str, str]) -> None:
        if not hasattr(local, "client"):
            local.client = Client(plane.port, ctx, host=NODE["node_ip"])
        ns, name = key
        code, _ = local.client.request(
            "PATCH",
            f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills/{name}",
            {"spec": {"ttl_seconds_after_finished": 0}},
            content_type="application/merge-patch+json",
        )
        assert code == 200, (key, code)

    with ThreadPoolExecutor(args.create_workers) as pool:
        list(pool.map(expire, names))
    census_deleting = None
    t0, last_progress, rss_peak, sockets_peak = time.time(), 0.0, rss_completed, sockets_completed
    while True:
        with watcher.lock:
            gone = sum(1 for k in names if (b := watcher.backfills.get(k)) is not None and b.deleted)
        now = time.time()
        rss_peak = max(rss_peak, operator.usage()["rss_mb"])
        if args.probe and census_deleting is None and gone >= len(names) // 2:
            census_deleting = probe_census(pid, "half expired") or {}
        sockets_peak = max(sockets_peak, open_sockets(pid))
        if now - last_progress >= args.progress_every:
            last_progress = now
            say(
                f"{now - t0:7.1f}s expired {gone}/{len(names)} | operator rss {operator.usage()['rss_mb']:.0f} MB, "
                f"{open_sockets(pid)} sockets"
            )
        if gone == len(names) or now > deadline:
            break
        time.sleep(0.5)
    t_gone = time.time()
    quiet_s, sockets_after = wait_quiet(pid)
    rss_after = operator.usage()["rss_mb"]
    census_after = rss_trimmed = None
    if args.probe:
        census_after = probe_census(pid, "after expiry")
        scale_probe.malloc_trim(pid)
        rss_trimmed = round(operator.usage()["rss_mb"], 1)
        say(f"--probe: operator rss after malloc_trim(0): {rss_trimmed:.0f} MB")
    say(
        f"expiry done in {t_gone - t0:.1f}s; quiet {quiet_s:.0f}s later: rss {rss_after:.0f} MB, {sockets_after} sockets"
    )
    return {
        "expired": gone,
        "expiry_s": round(t_gone - t0, 1),
        "quiet_after_s": round(quiet_s, 1),
        "sockets_all_completed": sockets_completed,
        "sockets_peak": sockets_peak,
        "sockets_after_expiry": sockets_after,
        "rss_baseline_mb": round(rss_baseline, 1),
        "rss_all_completed_mb": round(rss_completed, 1),
        "rss_peak_during_expiry_mb": round(rss_peak, 1),
        "rss_after_expiry_mb": round(rss_after, 1),
        "rss_after_malloc_trim_mb": rss_trimmed,
        "census_all_completed": census_completed,
        "census_half_expired": census_deleting,
        "census_after_expiry": census_after,
        "after_over_baseline": round(rss_after / rss_baseline, 2) if rss_baseline else None,
        "after_over_completed": round(rss_after / rss_completed, 2) if rss_completed else None,
    }


def figures_from(args, plane, watcher, sent, names, t0, t_end, usage, metrics_text, restarts, errors, operator) -> dict:
    with watcher.lock:
        backfills = dict(watcher.backfills)
        jobs = list(watcher.jobs.values())
    by_kind = {}
    jobs_per: Counter = Counter()
    for j in jobs:
        by_kind[(j.namespace, j.backfill, j.kind)] = j
        jobs_per[(j.namespace, j.backfill, j.kind)] += 1
    lat_stage, lat_done, lifetimes = [], [], {}
    for key in names:
        b = backfills.get(key)
        stage = by_kind.get((key[0], key[1], "staging"))
        xport = by_kind.get((key[0], key[1], "transport"))
        if stage and key in sent:
            lat_stage.append(stage.created - sent[key])
        if b and "completed" in b.status_at and xport and xport.finished:
            lat_done.append(b.status_at["completed"] - xport.finished)
        if b and "completed" in b.status_at and key in sent:
            lifetimes[key] = b.status_at["completed"] - sent[key]
    final = Counter((backfills.get(k).status if backfills.get(k) else "") or "pending" for k in names)
    stuck = [f"{ns}/{n}" for ns, n in names if (backfills.get((ns, n)) and backfills[(ns, n)].status) not in TERMINAL]

    req = read_audit(plane.audit_log)
    n = args.backfills
    patches = {k: req.status_patches.get(k, []) for k in names}
    per_min = [len(patches[k]) / (lifetimes[k] / 60) for k in lifetimes if lifetimes[k] > 0]
    counts = [len(v) for v in patches.values()]
    # Countdown writes: those between the transport phase's start and completion.
    burst = max((max_in_window(v, 1.0) for v in patches.values()), default=0)
    creates = {k: v for k, v in req.by_kind.items() if k.startswith("create jobs ")}
    dup_jobs = sum(1 for j in jobs if len(j.uids) > 1) + sum(1 for v in jobs_per.values() if v > 1)
    status_writes_metric = sum(float(m) for m in re.findall(r"^beam_status_writes_total (\S+)$", metrics_text, re.M))

    recovery = {}
    if "apiserver" in restarts:
        # Seconds after the new kube-apiserver process was started: its first successful
        # requests from the operator are the recovery. /readyz comes later than serving.
        at, back = restarts["apiserver"]["started"], restarts["apiserver"]["back"]
        after = [(t, v, r) for t, v, r, c in req.times if t >= at and c < 400]
        recovery = {
            "apiserver_stopped_for_s": round(at - restarts["apiserver"]["at"], 1),
            "apiserver_ready_after_s": round(back - at, 1),
            "first_watch_after_s": next((round(t - at, 2) for t, v, r in after if v == "watch"), None),
            "first_status_patch_after_s": next(
                (round(t - at, 2) for t, v, r in after if r == "beambackfills/status"), None
            ),
            "operator_restarted": operator.pids[-1] != restarts["apiserver"]["operator_pid"]
            if "operator" not in restarts
            else None,
        }

    completed_at = [b.status_at["completed"] for b in backfills.values() if "completed" in b.status_at]
    return {
        "command": " ".join([".venv/bin/python", "bench/scale.py", *sys.argv[1:]]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "kubernetes": K8S_VERSION,
            "kopf": _version("kopf"),
        },
        "job_syncs": args.job_syncs,
        "create_rate": args.create_rate,
        "backfills": n,
        "namespaces": args.namespaces,
        "chunks": args.chunks,
        "parallelism": args.parallelism,
        "worker_sleep_s": args.sleep,
        "final_status": dict(final),
        "stuck": stuck[:20],
        "stuck_count": len(stuck),
        "total_s": round((max(completed_at) if completed_at else t_end) - t0, 1),
        "create_errors": dict(errors),
        "latency_apply_to_staging_job_s": _lat(lat_stage),
        "latency_apply_to_staging_job_apiserver_s": _lat(req.apply_to_staging_job()),
        "apply_to_staging_job_parts_s": {k: _lat(v) for k, v in req.apply_to_staging_job_parts().items()},
        "latency_transport_done_to_completed_s": _lat(lat_done),
        "backfill_lifetime_s": {
            "p50": round(pct(list(lifetimes.values()), 50), 1),
            "max": round(max(lifetimes.values(), default=float("nan")), 1),
        },
        "operator": {
            "peak_rss_mb": round(usage["hwm_mb"], 1),
            "cpu_s": round(usage["cpu_s"], 1),
            "starts": len(operator.pids),
        },
        "api_requests": {
            "reads": req.total(READS),
            "writes": req.total(WRITES),
            "watches": req.total(WATCHES),
            "per_backfill": {
                "reads": round(req.total(READS) / n, 2),
                "writes": round(req.total(WRITES) / n, 2),
                "watches": round(req.total(WATCHES) / n, 3),
            },
            "by_kind": dict(req.by_kind.most_common()),
        },
        "status_patches": {
            "per_backfill_mean": round(sum(counts) / n, 2),
            "per_backfill_max": max(counts, default=0),
            "per_backfill_per_minute_p50": round(pct(per_min, 50), 2),
            "per_backfill_per_minute_max": round(max(per_min, default=float("nan")), 2),
            "most_in_any_1s_for_one_backfill": burst,
            "operator_metric_total_last_process": status_writes_metric,
        },
        "jobs": {
            "created_201": sum(v for k, v in creates.items() if k.endswith(" 201")),
            "already_exists_409": sum(v for k, v in creates.items() if k.endswith(" 409")),
            "seen": len(jobs),
            "duplicates": dup_jobs,
        },
        "restarts": restarts,
        "recovery": recovery,
        "watch_reconnects_of_benchmark": dict(watcher.reconnects),
    }


def _lat(values: list[float]) -> dict:
    return {
        "p50": round(pct(values, 50), 3),
        "p99": round(pct(values, 99), 3),
        "max": round(max(values, default=float("nan")), 3),
        "n": len(values),
    }


def _version(dist: str) -> str:
    from importlib.metadata import version

    try:
        return version(dist)
    except Exception:
        return "?"


def report(f: dict, args) -> None:
    las = f["latency_apply_to_staging_job_apiserver_s"]
    parts = ", ".join(
        f"{k.replace('_', ' ')} {v['p50']} / {v['p99']} s" for k, v in f.get("apply_to_staging_job_parts_s", {}).items()
    )
    la, ld, api, sp = (
        f["latency_apply_to_staging_job_s"],
        f["latency_transport_done_to_completed_s"],
        f["api_requests"],
        f["status_patches"],
    )
    print(
        f"""
command: {f["command"]}
machine: {f["machine"]}
{f["backfills"]} backfills x {f["chunks"]} chunks in {f["namespaces"]} namespaces: {f["final_status"]}; stuck {f["stuck_count"]} {f["stuck"][:5]}
total time until all completed: {f["total_s"]} s
apply -> staging Job created:     p50 {la["p50"]} s  p99 {la["p99"]} s  max {la["max"]} s  (n={la["n"]}; the benchmark's create sent -> its watch sees the Job)
  the same, apiserver's clock:    p50 {las["p50"]} s  p99 {las["p99"]} s  max {las["max"]} s  (n={las["n"]}; create received -> Job create answered, audit log)
  where it goes (apiserver's clock, p50 / p99): {parts}
transport finished -> completed:  p50 {ld["p50"]} s  p99 {ld["p99"]} s  max {ld["max"]} s  (n={ld["n"]})
operator: peak RSS {f["operator"]["peak_rss_mb"]} MB, CPU {f["operator"]["cpu_s"]} s, starts {f["operator"]["starts"]}; other processes' CPU s {f["cpu_s_of_other_processes"]}
API requests: reads {api["reads"]} writes {api["writes"]} watches {api["watches"]}; per backfill {api["per_backfill"]}
status patches per backfill: mean {sp["per_backfill_mean"]} max {sp["per_backfill_max"]}; per minute p50 {sp["per_backfill_per_minute_p50"]} max {sp["per_backfill_per_minute_max"]}; most in 1 s {sp["most_in_any_1s_for_one_backfill"]}
jobs: {f["jobs"]}
restarts: {f["restarts"]} recovery: {f["recovery"]}
by kind: {json.dumps(api["by_kind"])}""",
        flush=True,
    )
    if e := f.get("expiry"):
        print(
            f"expiry: {e['expired']}/{f['backfills']} deleted in {e['expiry_s']} s after their ttl was set to 0; operator RSS "
            f"before any backfill {e['rss_baseline_mb']} MB, all completed {e['rss_all_completed_mb']} MB, peak while "
            f"deleting {e['rss_peak_during_expiry_mb']} MB, after expiry {e['rss_after_expiry_mb']} MB "
            f"({e['after_over_baseline']}x the baseline, {e['after_over_completed']}x completed), {e['quiet_after_s']} s "
            f"after the last deletion; sockets all completed / peak / after: {e['sockets_all_completed']} / "
            f"{e['sockets_peak']} / {e['sockets_after_expiry']}"
            + (f"; after malloc_trim(0) {e['rss_after_malloc_trim_mb']} MB" if e["rss_after_malloc_trim_mb"] else "")
            + (
                f"; Kubernetes bodies in the operator, all ended / after expiry: {e['census_all_completed']['bodies']} / "
                f"{e['census_after_expiry']['bodies']}"
                if e["census_all_completed"] and e["census_after_expiry"]
                else ""
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
