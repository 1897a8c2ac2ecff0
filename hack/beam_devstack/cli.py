"""`beam-dev`: the local stack for people (the tests use the same modules through fixtures).

    beam-dev fetch    get and cache every binary and jar (Kubernetes is built from source);
                      --tests adds what only tests use (promtool, the browser)
    beam-dev up       start the stack in the background; prints endpoints and start times
    beam-dev status   what is running
    beam-dev down     stop everything `up` started
    beam-dev demo     up, then run the sample backfill end to end (see demo.py)
    beam-dev consume  print a few messages of a topic of the stack's Kafka

State lives in .devstack/ at the repository root: state.json (endpoints), pids/ (one pid file
per process, which is how `down` finds them) and logs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from beam_devstack.substrate.proc import progress, stop_pid_dir

ROOT = Path(__file__).resolve().parents[2]
STACK = Path(os.environ.get("BEAM_DEVSTACK_DIR", ROOT / ".devstack"))
STATE = STACK / "state.json"
PIDS = STACK / "pids"

# The dev stack's node (beam_devstack.substrate.node): a bridge and ranges of its own, apart from
# the test suite's (tests/node). One node runs per machine: a second one is refused with NodeBusy.
NODE = {"bridge": "beamdev0", "node_ip": "10.213.8.1", "pod_cidr": "10.213.8.0/24"}
# Servers that Pods use listen on the node's address.
ON_NODE = {"kafka", "gcs", "snowflake"}

# name -> (module, class); order is start order (the control plane comes first).
COMPONENTS = {
    "k8s": ("k8s", "ControlPlane"),
    "kafka": ("kafka", "Kafka"),
    "gcs": ("gcs", "FakeGcs"),
    "snowflake": ("snowflake", "FakeSnowflake"),
    "nats": ("nats", "Nats"),
    "sns": ("sns", "Sns"),
}


def _module(name: str):
    return importlib.import_module(f"beam_devstack.substrate.{name}")


def fetch(test_tools: bool = False) -> dict[str, float]:
    """What the stack needs, fetched or built once and cached; with `test_tools`, also what only
    tests use (promtool for the alert rules, the browser for the console's tests), which the
    demo never needs: promtool alone takes minutes to build on a fresh machine."""
    times = {}
    for name, (mod, _) in COMPONENTS.items():
        t = time.monotonic()
        progress("fetch", f"{name}: checking cache")
        _module(mod).ensure_installed()
        times[name] = time.monotonic() - t
    from beam_devstack.operator_proc import helm_binary

    t = time.monotonic()
    progress("fetch", "helm: checking cache")
    helm_binary()
    times["helm"] = time.monotonic() - t
    if test_tools:
        times.update(fetch_test_tools())
    # The real node (tests/node): Debian's containerd, runc, CNI plugins and image builders, the
    # node's Kubernetes binaries, then the images, built from the Dockerfiles when they changed.
    from beam_devstack import images
    from beam_devstack.substrate import node

    t = time.monotonic()
    progress("fetch", "node: Debian packages, kubelet, kube-proxy, kube-scheduler, images")
    subprocess.run(["bash", str(ROOT / "hack" / "node" / "install-packages.sh")], check=True)
    node.ensure_installed()
    images.ensure_built()
    times["node"] = time.monotonic() - t
    return times


def fetch_test_tools() -> dict[str, float]:
    times = {}
    from beam_devstack.substrate.promtool import promtool_binary

    t = time.monotonic()
    progress("fetch", "promtool: checking cache (first time: built from the Go module proxy, about 5 minutes)")
    promtool_binary()
    times["promtool"] = time.monotonic() - t
    # The console's browser tests (beam_devstack.substrate.browser): Debian's chromium and its
    # chromedriver, one source package, so their versions always match; nothing is downloaded at
    # test time.
    from beam_devstack.substrate.browser import CHROMEDRIVER, CHROMIUM
    from beam_devstack.substrate.proc import apt_install

    t = time.monotonic()
    progress("fetch", "browser: Debian's chromium and chromium-driver")
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not binary.is_file():
            apt_install(package, "browser")
    times["browser"] = time.monotonic() - t
    return times


def load_state() -> dict:
    return json.loads(STATE.read_text()) if STATE.exists() else {}


def up(components: list[str] | None = None) -> dict:
    """Start the stack detached; returns the state (endpoints and start seconds)."""
    state = load_state()
    if state and _all_alive():
        progress("up", f"already running ({STATE})")
        return state
    if state:
        down(quiet=True)
    STACK.mkdir(parents=True, exist_ok=True)
    fetch_times = fetch()
    state = {"components": {}, "start_seconds": {}, "fetch_seconds": fetch_times}
    t0 = time.monotonic()
    from beam_devstack import images
    from beam_devstack.substrate.node import Node

    node = Node(node_settings(images=images.ensure_built()))
    try:
        t = time.monotonic()
        node.prepare_network()
        state["start_seconds"]["network"] = round(time.monotonic() - t, 2)
        for name in components or list(COMPONENTS):
            mod, cls = COMPONENTS[name]
            t = time.monotonic()
            kw = {"node_ip": NODE["node_ip"]} if name == "k8s" else {"host": NODE["node_ip"]} if name in ON_NODE else {}
            server = getattr(_module(mod), cls)(STACK / name, detach=True, pid_dir=PIDS, **kw)
            server.start()
            state["components"][name] = server.endpoints()
            state["start_seconds"][name] = round(time.monotonic() - t, 2)
            if name == "k8s":
                t = time.monotonic()
                node.join(server)
                state["components"]["node"] = node.endpoints()
                state["start_seconds"]["node"] = round(time.monotonic() - t, 2)
            STATE.write_text(json.dumps(state, indent=2))
    except BaseException:
        progress("up", "start failed; stopping what was started")
        down(quiet=True)
        raise
    state["start_seconds"]["total"] = round(time.monotonic() - t0, 2)
    STATE.write_text(json.dumps(state, indent=2))
    fetched = sum(fetch_times.values())
    progress(
        "up",
        f"stack up: fetch/build {fetched:.1f}s, start {state['start_seconds']['total']:.1f}s "
        f"({', '.join(f'{k} {v:.1f}s' for k, v in state['start_seconds'].items() if k != 'total')})",
    )
    return state


def _all_alive() -> bool:
    pidfiles = list(PIDS.glob("*.pid"))
    if not pidfiles:
        return False
    for f in pidfiles:
        try:
            os.kill(int(f.read_text()), 0)
        except (ProcessLookupError, ValueError):
            return False
    return True


def node_settings(**kw):
    from beam_devstack.substrate import k8s
    from beam_devstack.substrate.node import NodeSettings

    return NodeSettings(state_dir=STACK / "node", service_cidr=k8s.SERVICE_CIDR, detach=True, **NODE, **kw)


def down(quiet: bool = False) -> list[str]:
    from beam_devstack.substrate.node import NodeBusy, cleanup

    # The control plane and the servers first: kube-apiserver is bound on the node's bridge
    # address, which the node's cleanup removes.
    stopped = stop_pid_dir(PIDS, grace=10) if PIDS.exists() else []
    try:
        removed = cleanup(node_settings())
    except NodeBusy as e:  # the test suite's node, not ours
        removed = [f"not the dev stack's node: {e}"]
    if removed:
        stopped.append(f"node ({', '.join(removed)})")
    STATE.unlink(missing_ok=True)
    if not quiet:
        progress("down", f"stopped {len(stopped)} processes: {', '.join(stopped) or 'none'}")
    return stopped


def status() -> int:
    state = load_state()
    if not state:
        print("stack is down (beam-dev up to start it)")
        return 1
    ok = True
    for f in sorted(PIDS.glob("*.pid")):
        pid = int(f.read_text())
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        ok &= alive
        print(f"{f.stem:<24} pid {pid:<8} {'running' if alive else 'DEAD'}")
    print(json.dumps(state["components"], indent=2))
    if "k8s" in state["components"]:
        print(f"\nexport KUBECONFIG={state['components']['k8s']['kubeconfig']}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="beam-dev", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    fetch_p = sub.add_parser("fetch", help="fetch and build what the stack needs into the cache")
    fetch_p.add_argument("--tests", action="store_true", help="and the tools only tests use (promtool, the browser)")
    sub.add_parser("up", help="start the stack in the background")
    sub.add_parser("down", help="stop the stack")
    sub.add_parser("status", help="show what runs")
    sub.add_parser(
        "images", help="build the project's images if their inputs changed; print `repository tag archive` per image"
    )
    demo = sub.add_parser("demo", help="start the stack and run the sample backfill")
    demo.add_argument(
        "--rows", type=int, default=int(os.environ.get("BEAM_DEMO_ROWS", "2000000")), help="synthetic rows to seed"
    )
    demo.add_argument("--manifest", default=str(ROOT / "examples" / "seed-usdc-base.yaml"))
    demo.add_argument("--down", action="store_true", help="tear the stack down after the demo")
    demo.add_argument(
        "--chunk-bytes",
        type=int,
        help="the operator's chunk_target_bytes (default 4 MiB, a dozen chunks; production's is 64 MiB)",
    )
    cons = sub.add_parser("consume", help="print messages of a Kafka topic of the stack (read_committed)")
    cons.add_argument("topic")
    cons.add_argument("--max", type=int, default=5)
    args = p.parse_args(argv)
    if args.cmd == "fetch":
        times = fetch(test_tools=args.tests)
        progress("fetch", "done: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()))
        return 0
    if args.cmd == "up":
        state = up()
        print(f"export KUBECONFIG={state['components']['k8s']['kubeconfig']}")
        return 0
    if args.cmd == "down":
        down()
        return 0
    if args.cmd == "status":
        return status()
    if args.cmd == "images":
        from beam_devstack import images

        for image in images.PROJECT_IMAGES:
            print(image.repository, image.tag(), image.archive())
        return 0
    if args.cmd == "consume":
        from beam_devstack.demo import consume

        return consume(args.topic, args.max)
    if args.cmd == "demo":
        from beam_devstack.demo import run_demo

        return run_demo(rows=args.rows, manifest=Path(args.manifest), teardown=args.down, chunk_bytes=args.chunk_bytes)
    return 2


if __name__ == "__main__":
    sys.exit(main())
