"""The checked-in BeamPreview CRD is the one the model generates, and it asks what a backfill asks."""

from __future__ import annotations

from pathlib import Path

import yaml

from beam_operator import crd

ROOT = Path(__file__).resolve().parents[2]


def test_the_checked_in_preview_crd_is_generated_from_the_model():
    for target in crd.PREVIEW_TARGETS:
        assert (ROOT / target).read_text() == crd.render_preview(), (
            f"{target} is stale: run `.venv/bin/python -m beam_operator.crd --write`"
        )


def test_a_preview_spec_has_the_backfill_spec_source_fields_and_rules():
    preview = crd.preview_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    backfill = crd.spec_schema()
    for field in ("table", "backfill_window", "filter", "columns"):
        assert preview["properties"][field] == backfill["properties"][field], field
    assert preview["required"] == ["table", "backfill_window"]
    assert yaml.safe_dump(preview).count("must be before end") == 1
