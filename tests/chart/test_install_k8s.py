"""The chart installed with helm into a real kube-apiserver (RBAC on), and what its identities
may then do, as `kubectl auth can-i` answers it. No nodes: the operator Pod never runs here."""

from __future__ import annotations

import os
import subprocess

import pytest
from chartlib import CHART

pytestmark = pytest.mark.k8s

RELEASE = "beam"
# Namespaces of its own: other test modules render the chart into theirs in the same session.
OPERATOR_NS = "beam-chart-install"
KEYS_NS = "beam-chart-install-keys"
ORG = "org-acme"


def _helm(helm, k8s, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, KUBECONFIG=str(k8s.kubeconfig))
    proc = subprocess.run([helm, *args], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def installed(helm, k8s):
    # Not KEYS_NS: the chart creates the API keys' namespace (api.createApiKeysNamespace).
    for ns in (OPERATOR_NS, ORG):
        k8s.create_namespace(ns, wait_service_account=False)
    _helm(
        helm,
        k8s,
        "install",
        RELEASE,
        str(CHART),
        "--namespace",
        OPERATOR_NS,
        "--set",
        "api.enabled=true",
        "--set",
        f"api.apiKeysNamespace={KEYS_NS}",
        "--set-json",
        f'worker.serviceAccount.namespaces=["{ORG}"]',
        "--set",
        "worker.networkPolicy.enabled=true",
        "--set-json",
        'worker.networkPolicy.allowedCIDRs=["10.213.0.1/32"]',
    )
    k8s.kubectl("wait", "--for=condition=Established", "crd/beambackfills.beam-backfill.dev", "--timeout=60s")
    yield
    _helm(helm, k8s, "uninstall", RELEASE, "--namespace", OPERATOR_NS, "--wait")
    for ns in (OPERATOR_NS, KEYS_NS, ORG):
        k8s.delete_namespace(ns)


def can_i(k8s, who: str, verb: str, resource: str, namespace: str | None = None) -> bool:
    where = ["--namespace", namespace] if namespace else ["--all-namespaces"]
    # kubectl reads "kind/x" as a resource name: a subresource goes in its own flag.
    resource, _, sub = resource.partition("/")
    extra = [f"--subresource={sub}"] if sub else []
    proc = k8s.kubectl("auth", "can-i", verb, resource, f"--as={who}", *where, *extra, check=False)
    assert proc.stdout.strip() in ("yes", "no"), proc.stdout + proc.stderr
    return proc.stdout.strip() == "yes"


OPERATOR = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}-beam-backfill"
API = f"system:serviceaccount:{OPERATOR_NS}:{RELEASE}-beam-backfill-api"
WORKER = f"system:serviceaccount:{ORG}:{RELEASE}-beam-backfill-worker"


@pytest.mark.parametrize(
    "verb, resource",
    [
        ("watch", "beambackfills.beam-backfill.dev"),
        ("patch", "beambackfills.beam-backfill.dev"),
        ("patch", "beambackfills.beam-backfill.dev/status"),
        ("update", "beambackfills.beam-backfill.dev/finalizers"),
        ("delete", "beambackfills.beam-backfill.dev"),
        ("create", "jobs.batch"),
        ("delete", "jobs.batch"),
        ("patch", "jobs.batch"),
        ("get", "pods"),
        ("create", "configmaps"),
        ("create", "events"),
        ("create", "events.events.k8s.io"),
        ("watch", "namespaces"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ],
)
def test_operator_may(installed, k8s, verb, resource):
    assert can_i(k8s, OPERATOR, verb, resource, ORG) and can_i(k8s, OPERATOR, verb, resource)


@pytest.mark.parametrize(
    "verb, resource",
    [
        ("get", "secrets"),
        ("list", "secrets"),
        ("delete", "beambackfills.beam-backfill.dev/status"),
        ("update", "jobs.batch/status"),
        ("create", "beambackfills.beam-backfill.dev"),
        ("create", "pods"),
        ("delete", "pods"),
        ("update", "jobs.batch"),
        ("create", "serviceaccounts"),
        ("create", "rolebindings.rbac.authorization.k8s.io"),
    ],
)
def test_operator_may_not(installed, k8s, verb, resource):
    assert not can_i(k8s, OPERATOR, verb, resource, ORG)


def test_api_reads_keys_only_in_its_namespace(installed, k8s):
    assert can_i(k8s, API, "create", "beambackfills.beam-backfill.dev", ORG)
    assert can_i(k8s, API, "patch", "beambackfills.beam-backfill.dev", ORG)
    assert not can_i(k8s, API, "delete", "beambackfills.beam-backfill.dev", ORG)
    # The keys namespace holds only key digests: the API lists and watches them, so that every
    # valid key id is known without a request per guess (docs/security.md, "API keys").
    assert can_i(k8s, API, "get", "secrets", KEYS_NS)
    assert can_i(k8s, API, "list", "secrets", KEYS_NS) and can_i(k8s, API, "watch", "secrets", KEYS_NS)
    assert not can_i(k8s, API, "list", "secrets", ORG) and not can_i(k8s, API, "watch", "secrets", ORG)
    assert not can_i(k8s, API, "get", "secrets", ORG)
    # Nor the release namespace, where Helm keeps its release Secrets (sh.helm.release.v1.*).
    assert not can_i(k8s, API, "get", "secrets", OPERATOR_NS)
    assert not can_i(k8s, API, "create", "jobs.batch", ORG)
    # A preview is asked of the operator through a BeamPreview; the API runs nothing and reads no
    # Pod or log, only the organization's Events for the console's detail page.
    assert can_i(k8s, API, "create", "beampreviews.beam-backfill.dev", ORG)
    assert can_i(k8s, API, "delete", "beampreviews.beam-backfill.dev", ORG)
    assert not can_i(k8s, API, "patch", "beampreviews.beam-backfill.dev/status", ORG)
    assert can_i(k8s, API, "list", "events", ORG) and not can_i(k8s, API, "create", "events", ORG)
    assert not can_i(k8s, API, "get", "pods", ORG) and not can_i(k8s, API, "get", "pods/log", ORG)


def test_worker_has_no_api_access(installed, k8s):
    for verb, resource in [("get", "secrets"), ("get", "pods"), ("get", "beambackfills.beam-backfill.dev")]:
        assert not can_i(k8s, WORKER, verb, resource, ORG)
    sa = k8s.api("GET", f"/api/v1/namespaces/{ORG}/serviceaccounts/{RELEASE}-beam-backfill-worker")
    assert sa["automountServiceAccountToken"] is False


def test_namespace_editors_manage_backfills(installed, k8s):
    """The chart's edit and view roles (aggregated into the built-in edit/admin/view) let an
    organization's member create and cancel backfills in their own namespace only, and a viewer
    only read them. Bound directly here: this control plane runs no aggregation controller."""
    k8s.kubectl(
        "create", "rolebinding", "alice-edit", f"--clusterrole={RELEASE}-beam-backfill-edit", "--user=alice", "-n", ORG
    )
    k8s.kubectl(
        "create", "rolebinding", "bob-view", f"--clusterrole={RELEASE}-beam-backfill-view", "--user=bob", "-n", ORG
    )
    assert can_i(k8s, "alice", "create", "beambackfills.beam-backfill.dev", ORG)
    assert can_i(k8s, "alice", "patch", "beambackfills.beam-backfill.dev", ORG)
    assert not can_i(k8s, "alice", "create", "beambackfills.beam-backfill.dev", OPERATOR_NS)
    assert not can_i(k8s, "alice", "patch", "beambackfills.beam-backfill.dev/status", ORG)
    assert can_i(k8s, "bob", "list", "beambackfills.beam-backfill.dev", ORG)
    assert not can_i(k8s, "bob", "create", "beambackfills.beam-backfill.dev", ORG)
    for role in ("edit", "view"):
        labels = k8s.api("GET", f"/apis/rbac.authorization.k8s.io/v1/clusterroles/{RELEASE}-beam-backfill-{role}")[
            "metadata"
        ]["labels"]
        assert labels[f"rbac.authorization.k8s.io/aggregate-to-{role}"] == "true"


def test_installed_objects(installed, k8s):
    dep = k8s.api("GET", f"/apis/apps/v1/namespaces/{OPERATOR_NS}/deployments/{RELEASE}-beam-backfill")
    assert dep["spec"]["strategy"]["type"] == "Recreate"
    names = {e["name"] for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "BEAM_JOBRUNNER_IMAGE" in names
    svc = k8s.api("GET", f"/api/v1/namespaces/{OPERATOR_NS}/services/{RELEASE}-beam-backfill-metrics")
    assert svc["spec"]["ports"][0]["port"] == 8080


def test_the_workers_network_policy_is_accepted_by_the_apiserver_and_selects_only_workers(installed, k8s):
    # Accepted as valid by kube-apiserver (the except ranges inside their CIDRs, the selectors);
    # enforcing it needs a CNI with NetworkPolicy, which the local node's bridge plugin is not.
    [policy] = k8s.api("GET", f"/apis/networking.k8s.io/v1/namespaces/{ORG}/networkpolicies")["items"]
    assert policy["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/managed-by"] == "beam-backfill-operator"
    blocks = [p["ipBlock"] for rule in policy["spec"]["egress"] for p in rule["to"] if "ipBlock" in p]
    public = next(b for b in blocks if b["cidr"] == "0.0.0.0/0")
    assert {"10.0.0.0/8", "169.254.0.0/16", "127.0.0.0/8"} <= set(public["except"])
    assert {"cidr": "10.213.0.1/32"} in blocks
