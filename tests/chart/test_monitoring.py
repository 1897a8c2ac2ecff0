"""The chart's monitoring kit: alerting rules checked and unit-tested by Prometheus' own promtool,
the Prometheus Operator objects rendered only where they can be, and the Grafana dashboard."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from beam_devstack.promql_names import DASHBOARD, RULES, dashboard_exprs, exposed_names, metric_names, rule_exprs
from beam_devstack.substrate.promtool import promtool_binary

ROOT = RULES.parents[3]


@pytest.fixture(scope="module")
def promtool():
    return promtool_binary()


def test_promtool_checks_the_rules(promtool):
    out = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS: 6 rules found" in out.stdout


def test_every_alert_fires_on_synthetic_series_when_it_should_and_only_then(promtool):
    tests = ROOT / "tests" / "chart" / "monitoring" / "rules-test.yaml"
    out = subprocess.run(
        [promtool, "test", "rules", tests.name], capture_output=True, text=True, timeout=120, cwd=tests.parent
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tested = {t["alertname"] for case in yaml.safe_load(tests.read_text())["tests"] for t in case["alert_rule_test"]}
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert tested == alerts, f"alerts without a test: {alerts - tested}"


def test_the_rendered_prometheus_rule_is_the_checked_file(render, promtool, tmp_path):
    docs = render("--set", "monitoring.prometheusRule.enabled=true", "--set", "monitoring.createWithoutCRDs=true")
    rule = docs.one("PrometheusRule")
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    extracted = tmp_path / "rendered.yaml"
    extracted.write_text(yaml.safe_dump(rule["spec"]))
    out = subprocess.run([promtool, "check", "rules", str(extracted)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_prometheus_operator_objects_only_where_its_crds_are_or_when_asked(render):
    on = ("--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.prometheusRule.enabled=true")
    assert not render().of("ServiceMonitor") and not render().of("PrometheusRule")  # off by default
    assert not render(*on).of("ServiceMonitor")  # enabled, but the cluster has no such CRDs
    served = render(*on, "--api-versions", "monitoring.coreos.com/v1", "--set", "api.enabled=true")
    monitors = served.of("ServiceMonitor")
    assert sorted(m["metadata"]["name"] for m in monitors) == ["beam-beam-backfill", "beam-beam-backfill-api"]
    assert {e["port"] for m in monitors for e in m["spec"]["endpoints"]} == {"metrics", "http"}
    assert served.of("PrometheusRule")
    assert render(*on, "--set", "monitoring.createWithoutCRDs=true").of("ServiceMonitor")


def test_the_dashboard_ships_as_a_configmap_for_grafanas_sidecar(render):
    assert not [c for c in render().of("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    cm = render("--set", "monitoring.grafanaDashboard.enabled=true").one("ConfigMap", "beam-beam-backfill-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["beam-backfill.json"]) == json.loads(DASHBOARD.read_text())


def test_the_metric_name_check_finds_what_an_expression_reads_and_flags_a_typo():
    expr = (
        'histogram_quantile(0.99, sum by (le, route) (rate(beam_api_request_duration_seconds_bucket{code=~"5.."}[5m])))'
    )
    assert metric_names(expr) == {"beam_api_request_duration_seconds_bucket"}
    assert metric_names('absent(up{job=~".*beam-backfill.*"} == 1)') == {"up"}
    exposed = exposed_names("# TYPE beam_rows_delivered counter\n# TYPE beam_chunks_left gauge\n")
    assert metric_names("sum(rate(beam_rows_delivered_total[5m]))") <= exposed
    assert not metric_names("sum(rate(beam_rows_delivred_total[5m]))") <= exposed  # a typo is caught
    assert all(metric_names(e) for e in dashboard_exprs() + rule_exprs())  # every panel reads a metric
