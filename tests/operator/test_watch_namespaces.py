"""watchNamespaces: the operator serves only the named namespaces, under Roles there, and can
read nothing elsewhere. The real operator process under the chart's RBAC, on the control plane."""

from __future__ import annotations

import json
import re
import urllib.parse

from op_helpers import backfill_body, get_bbf, wait_for

from beam_devstack.operator_proc import OperatorProcess, install_chart_rbac
from beam_devstack.substrate.k8s import unique_name


def _can_i(k8s, who: str, verb: str, resource: str, namespace: str | None) -> bool:
    where = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    proc = k8s.kubectl("auth", "can-i", verb, resource, f"--as={who}", *where, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


def test_with_watch_namespaces_a_backfill_elsewhere_is_left_alone_and_its_jobs_unreadable(
    k8s, crd_installed, helm, tmp_path
):
    served, other, home = unique_name("org-a"), unique_name("org-b"), unique_name("beam-watch")
    for ns in (served, other):
        k8s.create_namespace(ns)
    release = unique_name("w")[:12]
    kubeconfig = install_chart_rbac(
        k8s, helm, namespace=home, release=release, values=("--set-json", f'watchNamespaces=["{served}"]')
    )
    who = f"system:serviceaccount:{home}:{release}-beam-backfill"
    assert _can_i(k8s, who, "list", "jobs.batch", served) and _can_i(
        k8s, who, "watch", "beambackfills.beam-backfill.dev", served
    )
    assert not _can_i(k8s, who, "list", "jobs.batch", other)
    assert not _can_i(k8s, who, "get", "beambackfills.beam-backfill.dev", other)
    assert not _can_i(k8s, who, "list", "namespaces", None)
    assert not _can_i(k8s, who, "list", "customresourcedefinitions.apiextensions.k8s.io", None)

    path = "/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills"
    k8s.api("POST", path.format(ns=other), backfill_body("elsewhere"))
    operator = OperatorProcess(tmp_path / "operator", kubeconfig=kubeconfig, config={"BEAM_WATCH_NAMESPACES": served})
    operator.start()
    try:
        k8s.api("POST", path.format(ns=served), backfill_body("served"))
        sel = urllib.parse.quote("beam-backfill.dev/backfill=served")

        def staging_job():
            return k8s.api("GET", f"/apis/batch/v1/namespaces/{served}/jobs?labelSelector={sel}")["items"]

        wait_for(staging_job, 60, "the served namespace's staging Job")
        assert (get_bbf(k8s, served, "served").get("status") or {}).get("status") == "staging"
        # Created before the operator started, so any cluster-wide list would have found it by now.
        left = get_bbf(k8s, other, "elsewhere")
        assert "status" not in left and not left["metadata"].get("finalizers"), json.dumps(left["metadata"])
        assert k8s.api("GET", f"/apis/batch/v1/namespaces/{other}/jobs")["items"] == []
        logs = operator.logs()
        # A refusal, as kopf and kubeclient log one; not a bare "403", which a uid can contain.
        refused = re.compile(r"Traceback|forbidden|not enough permissions|HTTP 403\b|\b403[,:]", re.I)
        assert not [line for line in logs.splitlines() if refused.search(line)], logs[-3000:]
    finally:
        operator.stop()
        for ns in (served, other, home):
            k8s.delete_namespace(ns)
        for kind in ("clusterrole", "clusterrolebinding"):
            k8s.kubectl(
                "delete", kind, "-l", f"app.kubernetes.io/instance={release}", "--ignore-not-found", check=False
            )
