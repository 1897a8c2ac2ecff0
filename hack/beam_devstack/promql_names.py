"""The metric names a PromQL expression reads, and the names a Prometheus exposition offers: what
the chart's dashboard and alert tests compare (tests/chart, tests/e2e)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "beam-backfill"
DASHBOARD = CHART / "monitoring" / "dashboard.json"
RULES = CHART / "monitoring" / "rules.yaml"

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"')
_MATCHERS = re.compile(r"\{[^{}]*\}")
# Every metric the project exports starts with beam_; `up` is Prometheus' own.
_NAME = re.compile(r"(?<![A-Za-z0-9_:])(beam_[A-Za-z0-9_:]*|up)(?![A-Za-z0-9_:(])")


def metric_names(expr: str) -> set[str]:
    bare = _MATCHERS.sub("", _STRINGS.sub('""', expr))
    return set(_NAME.findall(bare))


def dashboard_exprs() -> list[str]:
    doc = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]


def rule_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def exposed_names(text: str) -> set[str]:
    """Every series name an exposition can carry, from its TYPE lines: a counter c exposes
    c_total (and c_created), a histogram h_bucket, h_count and h_sum, a gauge itself."""
    names = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(maxsplit=3)
        if kind == "counter":
            names |= {name.removesuffix("_total") + "_total", name.removesuffix("_total") + "_created"}
        elif kind == "histogram":
            names |= {name + "_bucket", name + "_count", name + "_sum", name + "_created"}
        else:
            names.add(name)
    return names
