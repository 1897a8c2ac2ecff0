#!/usr/bin/env python3
"""Markdown tables from bench/scale.py --json files, for docs/benchmarks.md.

.venv/bin/python bench/scale_report.py clean.json restarts.json
"""

from __future__ import annotations

import json
import sys


def row(name: str, values: list[str]) -> str:
    return f"| {name} | " + " | ".join(values) + " |"


def main() -> None:
    runs = [json.load(open(p)) for p in sys.argv[1:]]
    heads = []
    for r in runs:
        what = []
        if "apiserver" in r["restarts"]:
            what.append("kube-apiserver restarted")
        if "operator" in r["restarts"]:
            what.append("operator killed and restarted")
        heads.append(", ".join(what) or "no restart")
    lines = [row("run", heads), "|---|" + "---|" * len(runs)]

    def add(name, fn):
        lines.append(row(name, [str(fn(r)) for r in runs]))

    add("backfills x chunks (namespaces)", lambda r: f"{r['backfills']:,} x {r['chunks']} ({r['namespaces']})")
    add(
        "final status",
        lambda r: ", ".join(f"{k} {v}" for k, v in r["final_status"].items()) + f"; stuck {r['stuck_count']}",
    )
    add("total time, first create to last completed", lambda r: f"{r['total_s']:.0f} s")
    add(
        "apply → staging Job created, p50 / p99",
        lambda r: (
            f"{r['latency_apply_to_staging_job_s']['p50']:.2f} s / {r['latency_apply_to_staging_job_s']['p99']:.2f} s"
        ),
    )
    add(
        "apply → staging Job created, apiserver's clock (audit log), p50 / p99",
        lambda r: (
            f"{r['latency_apply_to_staging_job_apiserver_s']['p50']:.2f} s / {r['latency_apply_to_staging_job_apiserver_s']['p99']:.2f} s"
            if "latency_apply_to_staging_job_apiserver_s" in r
            else ""
        ),
    )
    add(
        "transport Job finished → `completed` written, p50 / p99",
        lambda r: (
            f"{r['latency_transport_done_to_completed_s']['p50']:.2f} s / {r['latency_transport_done_to_completed_s']['p99']:.2f} s"
        ),
    )
    add("operator peak RSS (VmHWM)", lambda r: f"{r['operator']['peak_rss_mb']:.0f} MB")
    add("operator CPU (user + system)", lambda r: f"{r['operator']['cpu_s']:.0f} s")
    add(
        "API requests per backfill: reads / writes / watches",
        lambda r: (
            f"{r['api_requests']['per_backfill']['reads']} / {r['api_requests']['per_backfill']['writes']} / {r['api_requests']['per_backfill']['watches']}"
        ),
    )
    add(
        "API requests in all: reads / writes / watches",
        lambda r: (
            f"{r['api_requests']['reads']:,} / {r['api_requests']['writes']:,} / {r['api_requests']['watches']:,}"
        ),
    )
    add(
        "status patches per backfill: mean / max",
        lambda r: f"{r['status_patches']['per_backfill_mean']} / {r['status_patches']['per_backfill_max']}",
    )
    add(
        "status patches per backfill per minute of its life: p50 / max",
        lambda r: (
            f"{r['status_patches']['per_backfill_per_minute_p50']} / {r['status_patches']['per_backfill_per_minute_max']}"
        ),
    )
    add(
        "most status patches of one backfill in any 1 s",
        lambda r: r["status_patches"]["most_in_any_1s_for_one_backfill"],
    )
    add(
        "Jobs created (201) / AlreadyExists (409) / duplicates",
        lambda r: f"{r['jobs']['created_201']:,} / {r['jobs']['already_exists_409']} / {r['jobs']['duplicates']}",
    )
    add(
        "new kube-apiserver started → operator's first watch / first status write (→ /readyz)",
        lambda r: (
            f"{r['recovery'].get('first_watch_after_s')} s / {r['recovery'].get('first_status_patch_after_s')} s ({r['recovery'].get('apiserver_ready_after_s')} s)"
            if r["recovery"]
            else ""
        ),
    )
    add(
        "CPU of the other processes",
        lambda r: ", ".join(f"{k} {v} s" for k, v in r.get("cpu_s_of_other_processes", {}).items()),
    )
    print("\n".join(lines))
    print()
    for r in runs:
        print(f"- `{r['command']}`")
        kinds = ", ".join(f"{k}: {v:,}" for k, v in r["api_requests"]["by_kind"].items() if v >= r["backfills"] // 10)
        print(f"  - requests by verb, resource and code (the larger ones): {kinds}")


if __name__ == "__main__":
    main()
