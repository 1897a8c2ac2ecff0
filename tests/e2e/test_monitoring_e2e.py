"""The dashboard's and the alerts' PromQL read only metrics a live operator and REST API export:
both are scraped through their Services on the local stack's node, as Prometheus would."""

from __future__ import annotations

import urllib.request

from beam_devstack.promql_names import dashboard_exprs, exposed_names, metric_names, rule_exprs

RELEASE_NS = "beam-system"


def _scrape(k8s, service: str, port_name: str) -> str:
    svc = k8s.api("GET", f"/api/v1/namespaces/{RELEASE_NS}/services/{service}")
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == port_name)
    with urllib.request.urlopen(f"http://{svc['spec']['clusterIP']}:{port}/metrics", timeout=10) as answer:
        return answer.read().decode()


def test_every_metric_the_dashboard_and_the_alerts_read_is_exported(k8s, operator):
    operator_text = _scrape(k8s, "beam-beam-backfill-metrics", "metrics")
    api_text = _scrape(k8s, "beam-beam-backfill-api", "http")
    exported = exposed_names(operator_text) | exposed_names(api_text) | {"up"}  # up: Prometheus' own
    assert "beam_backfills" in exported and "beam_api_request_duration_seconds_bucket" in exported
    for where, exprs in (("dashboard", dashboard_exprs()), ("alert rules", rule_exprs())):
        unknown = {name: e for e in exprs for name in metric_names(e) - exported}
        assert not unknown, f"the {where} read metrics nobody exports: {unknown}"
    # Bounded labels: nothing carries a backfill's name, a namespace or a topic.
    for line in operator_text.splitlines():
        if line.startswith("beam_") and "{" in line:
            labels = line[line.index("{") + 1 : line.index("}")]
            assert not any(k in labels for k in ("name=", "namespace=", "topic=", "backfill=")), line
