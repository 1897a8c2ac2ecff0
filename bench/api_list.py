"""Benchmark: latency of GET /api/v1/beam/backfills with 1,000 backfills in one organization.

  .venv/bin/python bench/api_list.py [--backfills 1000] [--requests 200]

Starts its own control plane (beam_devstack.substrate.k8s), installs the CRD and the chart's API
identity, runs `beam-api serve` under that ServiceAccount, creates the backfills through the API
and gives each an operator-like status (transporting, counts, conditions), so every listed
object has the size it has in production. Then lists sequentially from one client and reports
p50/p99, with the apiserver's own list time (same request, admin) for comparison.
Writes the figures into docs/benchmarks.md, section "REST API".
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "api"))

import orjson  # noqa: E402
from apiproc import KEYS_NS, ApiProcess, install_chart_identities  # noqa: E402
from kubernetes.client import CoreV1Api, CustomObjectsApi  # noqa: E402

from beam_devstack.operator_proc import helm_binary, install_crd  # noqa: E402
from beam_devstack.substrate.k8s import ControlPlane  # noqa: E402
from beam_operator.api import keys as keymod  # noqa: E402
from beam_operator.api.kube import Backfills, api_client  # noqa: E402
from beam_operator.api.public_job import creation_order, job_view  # noqa: E402


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} bench] {msg}", file=sys.stderr, flush=True)


def pct(samples: list[float], p: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


BODY = {
    "job_name": "USDC transfers on Base — Mar 2026",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {
        "partition_key": "block_timestamp",
        "start": "2026-03-01T00:00:00",
        "end": "2026-04-01T00:00:00",
    },
    "filter": {"column": "token_address", "values": ["0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"]},
    "destinations": [{"type": "kafka", "name": "base-usdc-transfers-backfill"}],
}


def status_for(uid: str, ns: str) -> dict:
    return {
        "status": {
            "status": "transporting",
            "job_id": uid,
            "workflow_id": f"beam-backfill-{ns}-{uid}",
            "num_chunks": 1000,
            "chunks_left": 423,
            "num_rows": 4_200_000,
            "time_created": "2026-11-22T10:30:00Z",
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Staged",
                    "status": "True",
                    "reason": "Staged",
                    "message": "staged 1000 chunks",
                    "lastTransitionTime": "2026-11-22T10:31:00Z",
                    "observedGeneration": 1,
                }
            ],
        }
    }


def timed_lists(fn, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def write_section(text: str) -> None:
    path = ROOT / "docs" / "benchmarks.md"
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    section = "## REST API\n"
    if section in doc:
        # Replace only this section: up to the next "## " heading or the end.
        doc = re.sub(r"## REST API\n.*?(?=\n## |\Z)", text.rstrip("\n") + "\n", doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text
    path.write_text(doc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backfills", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        tmp = Path(tmp)
        plane = ControlPlane(tmp / "k8s").start()
        api = None
        try:
            install_crd(plane)
            sa_kubeconfig = install_chart_identities(plane, helm_binary())["api"]
            ns = plane.create_namespace("org-bench", wait_service_account=False)
            admin = api_client(str(plane.kubeconfig))
            _, key = keymod.create_key(CoreV1Api(admin), KEYS_NS, ns, "bench")
            api = ApiProcess(tmp / "api", kubeconfig=sa_kubeconfig, rate=1e6, burst=1_000_000).start()

            say(f"creating {args.backfills} backfills through the API")
            t0 = time.perf_counter()
            with (
                httpx.Client(base_url=api.url + "/api/v1/beam", headers={"X-API-Key": key}, timeout=60) as c,
                ThreadPoolExecutor(8) as pool,
            ):
                ids = list(
                    pool.map(
                        lambda i: c.post("/backfills", json={**BODY, "job_name": f"bench {i}"}).json()["job_id"],
                        range(args.backfills),
                    )
                )
            create_s = time.perf_counter() - t0
            say(f"created in {create_s:.1f}s; writing operator-like status")
            custom = CustomObjectsApi(admin)
            items = custom.list_namespaced_custom_object("beam-backfill.dev", "v1alpha1", ns, "beambackfills")["items"]
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(
                        lambda o: custom.patch_namespaced_custom_object_status(
                            "beam-backfill.dev",
                            "v1alpha1",
                            ns,
                            "beambackfills",
                            o["metadata"]["name"],
                            status_for(o["metadata"]["uid"], ns),
                            _content_type="application/merge-patch+json",
                        ),
                        items,
                    )
                )

            with httpx.Client(base_url=api.url + "/api/v1/beam", headers={"X-API-Key": key}, timeout=60) as c:
                first = c.get("/backfills")
                body_bytes = len(first.content)
                listed = [j["job_id"] for j in first.json()]
                assert sorted(listed) == sorted(ids) and len(listed) == args.backfills
                timed_lists(lambda: c.get("/backfills").raise_for_status(), 10)  # warm-up
                say(f"listing {args.requests} times")
                api_ms = timed_lists(lambda: c.get("/backfills").raise_for_status(), args.requests)
            kube_ms = timed_lists(
                lambda: (
                    custom.list_namespaced_custom_object(
                        "beam-backfill.dev", "v1alpha1", ns, "beambackfills", _preload_content=False
                    ).data
                ),
                args.requests,
            )
            # The API's own steps, in this process: where the time goes besides the apiserver.
            backfills = Backfills(api_client(str(sa_kubeconfig)))
            read_ms = timed_lists(lambda: backfills.list(ns), args.requests)
            objs = backfills.list(ns)
            convert_ms = timed_lists(
                lambda: orjson.dumps([job_view(o) for o in sorted(objs, key=creation_order)]), args.requests
            )
        finally:
            if api:
                api.stop()
            plane.stop()

    p = lambda xs, q: f"{pct(xs, q):.0f}"  # noqa: E731
    say(f"API list: p50 {p(api_ms, 50)} ms, p99 {p(api_ms, 99)} ms; apiserver list alone p50 {p(kube_ms, 50)} ms")
    text = f"""## REST API

Command: `.venv/bin/python bench/api_list.py --backfills {args.backfills} --requests {args.requests}`
Machine: {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}; measured {time.strftime("%Y-%m-%d")}.
`GET /api/v1/beam/backfills` with {args.backfills:,} backfills in one organization, each with an
operator-like status (transporting, counts, one condition); {args.requests} sequential requests
from one client after 10 warm-up requests. The API runs as `beam-api serve` (one uvicorn worker)
under the chart's API ServiceAccount against the local kube-apiserver; answer {body_bytes / 1024:,.0f} KiB.
Single run; expect ±30 %.

| measurement | p50 | p99 |
|---|---|---|
| `GET /api/v1/beam/backfills` (auth, rate limit, list, convert, JSON) | {p(api_ms, 50)} ms | {p(api_ms, 99)} ms |
| the apiserver's list of the same namespace alone (admin, raw body) | {p(kube_ms, 50)} ms | {p(kube_ms, 99)} ms |
| of which in the API: list + orjson parse (`Backfills.list`) | {p(read_ms, 50)} ms | {p(read_ms, 99)} ms |
| of which in the API: sort + convert + serialize | {p(convert_ms, 50)} ms | {p(convert_ms, 99)} ms |
| creating the {args.backfills:,} backfills through the API (8 clients in parallel) | {create_s:.1f} s in total | |

Every list reads the apiserver (no cache in the API), so the answer is always what kubectl
shows. The rest of the end-to-end figure is the HTTP round trip of a ~700 KiB answer through
uvicorn and the client's JSON parse, on the same 2 cores as the apiserver and etcd.
"""
    print(text)
    if args.json:
        figures = {
            "backfills": args.backfills,
            "requests": args.requests,
            "answer_bytes": body_bytes,
            "create_seconds": create_s,
            **{
                f"{k}_ms": {"p50": pct(v, 50), "p99": pct(v, 99)}
                for k, v in (("api", api_ms), ("apiserver", kube_ms), ("read", read_ms), ("convert", convert_ms))
            },
        }
        args.json.write_text(json.dumps(figures, indent=1))
    if not args.no_write:
        write_section(text)
        say("wrote docs/benchmarks.md, section REST API")


if __name__ == "__main__":
    main()
