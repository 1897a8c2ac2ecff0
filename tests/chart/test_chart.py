"""The Helm chart: lints, renders, wires every operator setting, and grants no more than needed."""

from __future__ import annotations

import os
import subprocess

import pytest
import yaml
from chartlib import CHART, FULL_VALUES, REPO, container_env, run_template

from beam_operator.config import OperatorConfig

# Settings the chart derives from other values rather than from `config`.
# Set by the chart from other values: jobrunner, worker, metrics, the health port, watchNamespaces.
DERIVED = {
    "jobrunner_image",
    "image_pull_policy",
    "worker_service_account",
    "metrics_port",
    "liveness_endpoint",
    "watch_namespaces",
    "leader_election_lease",
    "leader_election_namespace",
}
ALL_ENV = {f"BEAM_{name.upper()}" for name in OperatorConfig.model_fields}


def test_helm_lint_strict(helm):
    for values in ([], ["--values", str(FULL_VALUES)]):
        proc = subprocess.run(
            [helm, "lint", "--strict", str(CHART), *values], capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "1 chart(s) linted, 0 chart(s) failed" in proc.stdout


def test_values_config_covers_every_operator_setting():
    config = yaml.safe_load((CHART / "values.yaml").read_text())["config"]
    assert set(config) | DERIVED == set(OperatorConfig.model_fields)
    assert not set(config) & DERIVED


def test_chart_crd_is_the_generated_crd():
    assert (CHART / "crds" / "beambackfills.yaml").read_bytes() == (
        REPO / "crds" / "beambackfills.yaml"
    ).read_bytes(), (
        "charts/beam-backfill/crds/beambackfills.yaml differs from crds/beambackfills.yaml: "
        "cp crds/beambackfills.yaml charts/beam-backfill/crds/"
    )


def test_default_render(render):
    docs = render()
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "CustomResourceDefinition",
            "CustomResourceDefinition",
            "Deployment",
            "Service",
            "ServiceAccount",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRole",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",  # the Lease (leader election)
            "RoleBinding",
        ]
    )
    assert sorted(d["metadata"]["name"] for d in docs.of("CustomResourceDefinition")) == [
        "beambackfills.beam-backfill.dev",
        "beampreviews.beam-backfill.dev",
    ]

    dep = docs.one("Deployment", "beam-beam-backfill")
    spec = dep["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    assert pod["serviceAccountName"] == "beam-beam-backfill"
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    (c,) = pod["containers"]
    assert c["image"] == "beam-backfill/operator:0.1.0"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 8080, "health": 8081}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]

    svc = docs.one("Service", "beam-beam-backfill-metrics")
    assert svc["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    assert svc["spec"]["selector"].items() <= spec["template"]["metadata"]["labels"].items()

    worker = docs.one("ServiceAccount", "beam-beam-backfill-worker")
    assert worker["automountServiceAccountToken"] is False
    assert worker["metadata"]["namespace"] == "beam-system"


def config_from(env: dict[str, str], monkeypatch) -> OperatorConfig:
    """What the operator reads from the container's env (pydantic-settings' own parsing)."""
    for k in [k for k in os.environ if k.startswith("BEAM_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return OperatorConfig()


def test_default_env_is_every_setting_at_the_operators_defaults(render, monkeypatch):
    env = container_env(render().one("Deployment"))
    beam = {k: v for k, v in env.items() if k.startswith("BEAM_")}
    assert set(beam) == ALL_ENV
    parsed = config_from(beam, monkeypatch)
    expected = OperatorConfig(worker_service_account="beam-beam-backfill-worker")
    assert parsed == expected


def test_full_values_reach_the_operator(render, monkeypatch):
    docs = render("--values", str(FULL_VALUES))
    dep = docs.one("Deployment", "beam-ops")
    env = container_env(dep)
    assert set(k for k in env if k.startswith("BEAM_")) == ALL_ENV
    config = config_from({k: v for k, v in env.items() if k.startswith("BEAM_")}, monkeypatch)
    full = yaml.safe_load(FULL_VALUES.read_text())
    for name, value in full["config"].items():
        got = getattr(config, name)
        assert (got.model_dump() if hasattr(got, "model_dump") else got) == value, name
    assert config.jobrunner_image == "registry.example.com/beam/jobrunner:1.2.4"
    assert config.image_pull_policy == "Always"
    assert config.worker_service_account == "beam-worker"
    assert config.metrics_port == 9090
    # Big numbers survive Helm's float64 values unmangled (no 1.34217728e+08).
    assert env["BEAM_CHUNK_TARGET_BYTES"] == "134217728"

    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "registry.example.com/beam/operator:1.2.3" and c["imagePullPolicy"] == "Always"
    assert c["args"] == ["--verbose"]
    assert env["HTTPS_PROXY"] == "http://proxy.example.com:3128"
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9090, "health": 9081}
    assert c["resources"]["limits"] == {"cpu": "1", "memory": "600Mi"}
    assert pod["serviceAccountName"] == "beam-operator-sa"
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert pod["nodeSelector"] == {"pool": "system"}
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert "nodeAffinity" in pod["affinity"]
    assert pod["securityContext"]["runAsUser"] == 20000
    assert dep["spec"]["template"]["metadata"]["annotations"] == {"example.com/owner": "data-platform"}
    assert dep["spec"]["template"]["metadata"]["labels"]["team"] == "data"

    svc = docs.one("Service", "beam-ops-metrics")
    assert svc["spec"]["ports"][0]["port"] == 9090
    assert svc["metadata"]["annotations"] == {"prometheus.io/scrape": "true"}

    # The worker ServiceAccount exists wherever Jobs may run: the release namespace and each
    # listed organization.
    workers = [d for d in docs.of("ServiceAccount") if d["metadata"]["name"] == "beam-worker"]
    assert sorted(w["metadata"]["namespace"] for w in workers) == ["beam-system", "org-acme", "org-globex"]
    assert all(w["automountServiceAccountToken"] is False for w in workers)
    assert docs.one("ServiceAccount", "beam-operator-sa")["metadata"]["annotations"]


# Exactly the operator's rules (see the comments in templates/rbac.yaml): a new permission must
# be a deliberate change to this list.
OPERATOR_RULES = {
    ("beam-backfill.dev", "beambackfills"): {"get", "list", "watch", "patch", "delete"},
    ("beam-backfill.dev", "beambackfills/status"): {"get", "patch"},
    ("beam-backfill.dev", "beambackfills/finalizers"): {"update"},
    # previews (docs/console.md): run each one's Job, report in status, delete the ones left behind
    ("beam-backfill.dev", "beampreviews"): {"get", "list", "watch", "delete"},
    ("beam-backfill.dev", "beampreviews/status"): {"patch"},
    ("beam-backfill.dev", "beampreviews/finalizers"): {"update"},
    ("batch", "jobs"): {"get", "list", "watch", "create", "delete", "patch"},
    ("", "pods"): {"get", "list", "watch"},
    ("", "configmaps"): {"create"},
    ("", "secrets"): {"create"},  # each backfill's staged-data key; never read, listed or changed
    ("", "events"): {"create", "patch", "list"},
    ("events.k8s.io", "events"): {"create", "patch"},
    ("", "namespaces"): {"list", "watch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
}


def _grants(role) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def test_operator_clusterrole_is_least_privilege(render):
    docs = render()
    role = docs.one("ClusterRole", "beam-beam-backfill-operator")
    for rule in role["rules"]:
        for key in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[key], f"wildcard in {key}: {rule}"
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule
    grants = _grants(role)
    assert grants[("", "secrets")] == {"create"}, "the operator creates staged-data keys and reads no Secret"
    assert grants == OPERATOR_RULES

    binding = docs.one("ClusterRoleBinding", "beam-beam-backfill-operator")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "beam-beam-backfill", "namespace": "beam-system"}]


def test_no_cluster_role_reads_secrets(render):
    for docs in (render(), render("--values", str(FULL_VALUES))):
        for role in docs.of("ClusterRole"):
            reads = {v for k, verbs in _grants(role).items() if k[1] == "secrets" for v in verbs} - {"create"}
            assert not reads, role["metadata"]["name"]


def test_api_identity_is_off_by_default_and_confined_when_on(render):
    assert not [
        d
        for d in render()
        if d["metadata"]["name"].endswith("-api")
        or (d["kind"] in ("Role", "RoleBinding") and not d["metadata"]["name"].endswith("-leader"))
    ]

    docs = render("--set", "api.enabled=true")
    sa = docs.one("ServiceAccount", "beam-beam-backfill-api")
    api_role = docs.one("ClusterRole", "beam-beam-backfill-api")
    assert _grants(api_role) == {
        ("beam-backfill.dev", "beambackfills"): {"list", "create", "patch"},
        ("beam-backfill.dev", "beampreviews"): {"create", "get", "delete"},
        ("", "events"): {"list"},  # the console's detail page; never Secrets, Pods or logs
    }
    keys = docs.one("Role", "beam-beam-backfill-api-keys")
    assert keys["metadata"]["namespace"] == "beam-system-api-keys"  # never the release namespace
    assert _grants(keys) == {("", "secrets"): {"get", "list", "watch"}}  # key digests only: the watch of valid key ids
    for binding in (
        docs.one("ClusterRoleBinding", "beam-beam-backfill-api"),
        docs.one("RoleBinding", "beam-beam-backfill-api-keys"),
    ):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "beam-system"}
        ]

    keys = render("--values", str(FULL_VALUES)).one("Role", "beam-ops-api-keys")
    assert keys["metadata"]["namespace"] == "beam-api-keys"


def test_rbac_and_service_accounts_can_be_left_to_the_cluster_admin(render, helm):
    docs = render(
        "--set",
        "rbac.create=false",
        "--set",
        "serviceAccount.create=false",
        "--set",
        "serviceAccount.name=ops",
        "--set",
        "worker.serviceAccount.create=false",
        "--set",
        "api.enabled=true",
        "--set",
        "api.serviceAccount.create=false",
        "--set",
        "api.serviceAccount.name=api",
        "--set",
        "api.createApiKeysNamespace=false",
    )
    # The CRDs, the operator's Deployment and metrics Service, and the API's Deployment, Service
    # and the Secret that signs the console's sessions (no RBAC object, no identity).
    assert sorted(d["kind"] for d in docs) == [
        "CustomResourceDefinition",
        "CustomResourceDefinition",
        "Deployment",
        "Deployment",
        "Secret",
        "Service",
        "Service",
    ]
    dep = docs.one("Deployment", "beam-beam-backfill")
    assert dep["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert docs.one("Deployment", "beam-beam-backfill-api")["spec"]["template"]["spec"]["serviceAccountName"] == "api"
    # No worker ServiceAccount: Jobs fall back to their namespace's default one.
    assert container_env(dep)["BEAM_WORKER_SERVICE_ACCOUNT"] == ""

    proc = run_template(helm, "--set", "serviceAccount.create=false")
    assert proc.returncode != 0
    assert "serviceAccount.name is required when serviceAccount.create is false" in proc.stderr


@pytest.mark.parametrize(
    "args, complaint",
    [
        (["--set", "config.staging_bukcet=x"], "staging_bukcet"),
        (["--set", "config.stage_strategy=copy"], "stage_strategy"),
        (["--set", "config.default_parallelism=0"], "default_parallelism"),
        (["--set", "config.chunk_target_bytes=lots"], "chunk_target_bytes"),
        (["--set", "operator.image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "config.allowed_tables={drop table x}"], "allowed_tables"),
        (["--set", "replicas=2"], "replicas"),
    ],
    ids=["typo", "enum", "minimum", "type", "pull-policy", "table-pattern", "unknown-top-level"],
)
def test_schema_rejects_bad_values(helm, args, complaint):
    proc = run_template(helm, *args)
    assert proc.returncode != 0, f"helm accepted {args}"
    assert "values don't meet the specifications of the schema" in proc.stderr
    assert complaint in proc.stderr, proc.stderr


def test_the_workers_network_policy_is_off_by_default_and_covers_every_worker_namespace(render):
    assert not render().of("NetworkPolicy")
    docs = render(
        "--set", "worker.networkPolicy.enabled=true", "--set-json", 'worker.serviceAccount.namespaces=["org-a","org-b"]'
    )
    policies = docs.of("NetworkPolicy")
    assert sorted(p["metadata"]["namespace"] for p in policies) == ["beam-system", "org-a", "org-b"]
    for p in policies:
        assert p["spec"]["policyTypes"] == ["Ingress", "Egress"] and "ingress" not in p["spec"]
        dns, public = p["spec"]["egress"]
        assert {x["port"] for x in dns["ports"]} == {53}
        v4 = public["to"][0]["ipBlock"]
        assert v4["cidr"] == "0.0.0.0/0" and "169.254.0.0/16" in v4["except"]


def test_each_organizations_worker_service_account_may_have_an_identity_of_its_own(render):
    docs = render(
        "--set-json",
        'worker.serviceAccount.namespaces=["org-a","org-b"]',
        "--set-json",
        'worker.serviceAccount.annotations={"team": "data"}',
        "--set-json",
        'worker.serviceAccount.annotationsByNamespace={"org-a": {"iam.gke.io/gcp-service-account": "a@p.iam"}}',
    )
    by_ns = {
        sa["metadata"]["namespace"]: sa["metadata"].get("annotations")
        for sa in docs.of("ServiceAccount")
        if sa["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    }
    assert by_ns["org-a"] == {"team": "data", "iam.gke.io/gcp-service-account": "a@p.iam"}
    assert by_ns["org-b"] == {"team": "data"} and by_ns["beam-system"] == {"team": "data"}


def test_watched_namespaces_get_roles_and_the_operator_nothing_cluster_scoped(render):
    docs = render("--set-json", 'watchNamespaces=["org-a","org-b"]')
    roles = docs.of("Role")
    assert sorted(r["metadata"]["namespace"] for r in roles if r["metadata"]["name"].endswith("-operator")) == [
        "org-a",
        "org-b",
    ]
    operator_roles = [r for r in roles if r["metadata"]["name"].endswith("-operator")]
    cluster_scoped = {("", "namespaces"), ("apiextensions.k8s.io", "customresourcedefinitions")}
    namespaced = {k: v for k, v in OPERATOR_RULES.items() if k not in cluster_scoped}
    assert all(_grants(r) == namespaced for r in operator_roles)
    assert not [r for r in docs.of("ClusterRole") if r["metadata"]["name"].endswith("-operator")]
    assert not [b for b in docs.of("ClusterRoleBinding") if b["metadata"]["name"].endswith("-operator")]
    bindings = [b for b in docs.of("RoleBinding") if b["metadata"]["name"].endswith("-operator")]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["org-a", "org-b"]
    assert container_env(docs.one("Deployment", "beam-beam-backfill"))["BEAM_WATCH_NAMESPACES"] == "org-a,org-b"
    # By default: the ClusterRole with exactly the same rules plus the cluster-scoped ones.
    default = render()
    assert _grants(default.one("ClusterRole", "beam-beam-backfill-operator")) == OPERATOR_RULES
    assert container_env(default.one("Deployment", "beam-beam-backfill"))["BEAM_WATCH_NAMESPACES"] == ""


def test_replicas_stand_by_behind_one_lease_with_a_disruption_budget(render):
    one = render()
    dep = one.one("Deployment", "beam-beam-backfill")
    env = container_env(dep)
    assert (
        env["BEAM_LEADER_ELECTION_LEASE"] == "beam-beam-backfill"
        and env["BEAM_LEADER_ELECTION_NAMESPACE"] == "beam-system"
    )
    assert not one.of("PodDisruptionBudget")
    lease = one.one("Role", "beam-beam-backfill-leader")
    assert lease["metadata"]["namespace"] == "beam-system"
    assert {tuple(r["verbs"]): r.get("resourceNames") for r in lease["rules"]} == {
        ("create",): None,
        ("get", "update"): ["beam-beam-backfill"],
    }
    two = render("--set", "operator.replicas=2")
    spec = two.one("Deployment", "beam-beam-backfill")["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    pdb = two.one("PodDisruptionBudget", "beam-beam-backfill")
    assert pdb["spec"]["minAvailable"] == 1
    assert not render("--set", "operator.replicas=2", "--set", "operator.podDisruptionBudget.enabled=false").of(
        "PodDisruptionBudget"
    )
