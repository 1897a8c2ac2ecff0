"""Every example manifest is a valid BeamBackfill (the same model the CRD is generated from)."""

from pathlib import Path

import pytest
import yaml

from beam_contract.model import BackfillSpec

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))


def test_there_is_an_example_for_each_destination_type():
    types = {d["type"] for p in EXAMPLES for d in yaml.safe_load(p.read_text())["spec"]["destinations"]}
    assert types == {"kafka", "webhook", "nats", "sns"}


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_is_valid(path):
    doc = yaml.safe_load(path.read_text())
    assert doc["apiVersion"] == "beam-backfill.dev/v1alpha1" and doc["kind"] == "BeamBackfill"
    BackfillSpec.model_validate(doc["spec"])
