"""The chart's optional API Deployment: off by default, and when on, it runs `beam-api serve`
under the API's own ServiceAccount, reading keys from the namespace its Role covers."""

from __future__ import annotations

import subprocess

import yaml

from beam_devstack.operator_proc import CHART


def render(helm, *args):
    out = subprocess.run(
        [helm, "template", "beam", str(CHART), "--namespace", "beam-system", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def one(docs, kind, name):
    [d] = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return d


def test_api_deployment_is_off_by_default(helm):
    assert not [d for d in render(helm) if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "api"]


def test_api_keys_have_a_namespace_of_their_own_by_default_and_never_the_release_namespace(helm):
    docs = render(helm, "--set", "api.enabled=true")
    env = {
        e["name"]: e.get("value")
        for e in one(docs, "Deployment", "beam-beam-backfill-api")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["BEAM_API_KEYS_NAMESPACE"] == "beam-system-api-keys"
    assert one(docs, "Role", "beam-beam-backfill-api-keys")["metadata"]["namespace"] == "beam-system-api-keys"
    ns = one(docs, "Namespace", "beam-system-api-keys")
    assert ns["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"  # the keys outlive an uninstall
    assert not [
        d
        for d in render(helm, "--set", "api.enabled=true", "--set", "api.createApiKeysNamespace=false")
        if d["kind"] == "Namespace"
    ]
    out = subprocess.run(
        [
            helm,
            "template",
            "beam",
            str(CHART),
            "--namespace",
            "beam-system",
            "--set",
            "api.enabled=true",
            "--set",
            "api.apiKeysNamespace=beam-system",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert 'api.apiKeysNamespace must not be the release namespace "beam-system"' in out.stderr


def test_api_deployment_runs_under_the_api_identity(helm):
    docs = render(
        helm,
        "--set",
        "api.enabled=true",
        "--set",
        "api.apiKeysNamespace=beam-api-keys",
        "--set-json",
        "api.rateLimit.perSecond=2.5",
        "--set",
        "api.port=9000",
    )
    dep = one(docs, "Deployment", "beam-beam-backfill-api")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "beam-beam-backfill-api"
    assert (
        pod["serviceAccountName"]
        != one(docs, "Deployment", "beam-beam-backfill")["spec"]["template"]["spec"]["serviceAccountName"]
    )
    (c,) = pod["containers"]
    assert c["command"] == ["beam-api", "serve", "--host", "0.0.0.0", "--port", "9000"]
    assert c["image"] == "beam-backfill/operator:0.1.0"
    env = {e["name"]: e.get("value") for e in c["env"]}
    # The console's session secret comes from the chart's Secret, never as a value in the manifest.
    [session] = [e for e in c["env"] if e["name"] == "BEAM_API_SESSION_SECRET"]
    assert session["valueFrom"]["secretKeyRef"] == {"name": "beam-beam-backfill-api-session", "key": "secret"}
    assert one(docs, "Secret", "beam-beam-backfill-api-session")["data"]["secret"]
    keys_role = one(docs, "Role", "beam-beam-backfill-api-keys")
    assert env["BEAM_API_KEYS_NAMESPACE"] == keys_role["metadata"]["namespace"] == "beam-api-keys"
    assert (env["BEAM_API_RATE_LIMIT_PER_SECOND"], env["BEAM_API_RATE_LIMIT_BURST"]) == ("2.5", "20")
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    svc = one(docs, "Service", "beam-beam-backfill-api")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_schema_rejects_a_bad_api_value(helm):
    out = subprocess.run(
        [helm, "template", "beam", str(CHART), "--set", "api.enabled=true", "--set", "api.rateLimit.burst=0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0 and "burst" in out.stderr
