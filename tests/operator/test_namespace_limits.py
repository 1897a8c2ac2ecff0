"""One organization cannot exhaust the operator (issue 25): a namespace holds at most
config.max_live_backfills_per_namespace live backfills, the rest end `failed` before any Job;
the operator keeps a backfill's filter as its first value, so its memory does not grow with
filters. The real operator process under the chart's RBAC, on the control plane."""

from __future__ import annotations

import json
import re

from op_helpers import backfill_body, get_bbf, jobs_of, wait_for

from beam_devstack.operator_proc import OperatorProcess
from beam_devstack.substrate.k8s import unique_name

PATH = "/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills"
CHART_OPERATOR_LIMIT_MB = 512  # charts/beam-backfill/values.yaml, operator.resources.limits.memory


def _backfill(name: str, n_values: int) -> dict:
    values = [f"0x{name.encode().hex()[:8]:0>8}{i:032x}" for i in range(n_values)]  # 42 characters each
    return backfill_body(name, filter={"column": "token_address", "values": values}, suspend=True)


def _rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_backfills_with_large_filters_is_refused_past_the_namespace_limit(
    k8s, crd_installed, operator_kubeconfig, tmp_path
):
    flooding, other = unique_name("org-flood"), unique_name("org-calm")
    for ns in (flooding, other):
        k8s.create_namespace(ns)
    config = {"BEAM_MAX_LIVE_BACKFILLS_PER_NAMESPACE": "3"}
    operator = OperatorProcess(tmp_path / "operator", kubeconfig=operator_kubeconfig, config=config).start()
    try:
        names = [f"flood-{i}" for i in range(8)]
        for name in names:  # about 400 KB of filter each
            k8s.api("POST", PATH.format(ns=flooding), _backfill(name, 8_000))
        k8s.api("POST", PATH.format(ns=other), _backfill("calm", 10))

        def settled():
            got = {n: (get_bbf(k8s, flooding, n).get("status") or {}) for n in names}
            return got if all(s.get("status") for s in got.values()) else None

        got = wait_for(settled, 120, "every flooding backfill judged")
        admitted = [n for n, s in got.items() if s["status"] == "staging"]
        refused = [n for n, s in got.items() if s["status"] == "failed"]
        assert admitted == names[:3] and refused == names[3:], got
        for n in refused:
            # 3, or more while an earlier refused one was not yet marked failed
            assert re.match(
                rf"namespace {flooding} already holds [3-7] live backfills, the most this operator allows one "
                r"organization \(config.max_live_backfills_per_namespace: 3\); create it again once some have ended",
                got[n]["error_message"],
            ), got[n]
            assert jobs_of(k8s, flooding, get_bbf(k8s, flooding, n)["metadata"]["uid"]) == []
        # Another organization is not held back by this one's flood.
        wait_for(lambda: (get_bbf(k8s, other, "calm").get("status") or {}).get("status") == "staging", 60, "calm")
        assert _rss_mb(operator.proc.pid) < CHART_OPERATOR_LIMIT_MB / 2
        # Restarted, it reads them all again (a page at a time) and stays as small.
        operator.stop()
        operator.start()
        k8s.api("POST", PATH.format(ns=other), _backfill("after-restart", 10))
        wait_for(
            lambda: (get_bbf(k8s, other, "after-restart").get("status") or {}).get("status") == "staging", 60, "served"
        )
        assert _rss_mb(operator.proc.pid) < CHART_OPERATOR_LIMIT_MB / 2
        listed = json.loads(k8s.kubectl("get", "bbf", "-n", flooding, "-o", "json").stdout)["items"]
        assert len(listed) == len(names)
    finally:
        operator.stop()
        for ns in (flooding, other):
            k8s.delete_namespace(ns)
