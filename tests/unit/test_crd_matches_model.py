"""The checked-in CRD is exactly what the model generates, and the model refuses what the CRD refuses."""

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from beam_contract.model import BackfillSpec, BackfillStatus
from beam_operator import crd

ROOT = Path(__file__).resolve().parents[2]


def test_checked_in_crd_equals_the_model():
    on_disk = (ROOT / "crds" / "beambackfills.yaml").read_text()
    assert on_disk == crd.render(), "crds/ is stale: run `.venv/bin/python -m beam_operator.crd --write`"


def test_crd_has_status_subresource_and_printer_columns():
    v = yaml.safe_load(crd.render())["spec"]["versions"][0]
    assert v["subresources"] == {"status": {}}
    cols = {c["name"]: c for c in v["additionalPrinterColumns"]}
    default = ["Status", "Chunks", "Left", "Suspended", "Table", "Age"]
    wide = ["Rows", "Delivered", "Staging-Started", "Transporting-Started", "Completed", "Error"]
    assert list(cols) == default + wide
    assert all("priority" not in cols[n] for n in default), "kubectl get bbf keeps its columns"
    assert all(cols[n]["priority"] == 1 for n in wide), "shown by -o wide"
    assert [cols[n]["jsonPath"] for n in wide] == [
        ".status.num_rows",
        ".status.rows_delivered",
        ".status.time_staging_started",
        ".status.time_transporting_started",
        ".status.time_completed",
        ".status.error_message",
    ]
    assert [cols[n]["type"] for n in wide] == ["integer", "integer", "date", "date", "date", "string"]
    # every column's path is a status field the model writes (or the spec's, or metadata's)
    fields = set(BackfillStatus.model_fields)
    for c in cols.values():
        if c["jsonPath"].startswith(".status."):
            assert c["jsonPath"].removeprefix(".status.").split("[")[0] in fields, c


def test_every_spec_field_has_a_description_for_kubectl_explain():
    spec = yaml.safe_load(crd.render())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    missing = [n for n, p in spec["properties"].items() if not p.get("description")]
    assert missing == []


SEED = {
    "job_name": "USDC transfers on Base — Mar 2026",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {
        "partition_key": "block_timestamp",
        "start": "2026-03-01T00:00:00",
        "end": "2026-04-01T00:00:00",
    },
    "filter": {"column": "token_address", "values": ["0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"]},
    "destinations": [{"type": "kafka", "name": "base-usdc-transfers-backfill"}],
}


def test_seed_examples_are_valid():
    BackfillSpec.model_validate(SEED)
    BackfillSpec.model_validate(
        {**SEED, "backfill_window": {"partition_key": "block", "start": 100, "end": 200}, "static_egress_ip": False}
    )


@pytest.mark.parametrize(
    "patch, fragment",
    [
        (
            {
                "backfill_window": {
                    "partition_key": "block_timestamp",
                    "start": "2026-04-01T00:00:00",
                    "end": "2026-03-01T00:00:00",
                }
            },
            "must be before end",
        ),
        ({"backfill_window": {"partition_key": "block", "start": 5, "end": 5}}, "must be less than end"),
        (
            {
                "backfill_window": {
                    "partition_key": "block_timestamp",
                    "start": "March 1st",
                    "end": "2026-03-01T00:00:00",
                }
            },
            "not an ISO 8601 timestamp",
        ),
        ({"backfill_window": {"partition_key": "slot", "start": 1, "end": 2}}, "partition_key"),
        ({"destinations": []}, "at least 1"),
        ({"filter": {"column": "token_address", "values": []}}, "at least 1"),
        ({"filter": {"column": "token_address; drop table x", "values": ["a"]}}, "pattern"),
        ({"filter": {"column": "token_address", "values": ["a" * 1025]}}, "at most 1024 characters"),
        ({"table": "base.assets.x; drop table y"}, "pattern"),
        ({"destinations": [{"type": "kafka", "name": "t"}, {"type": "kafka", "name": "t"}]}, "listed twice"),
        ({"destinations": [{"type": "webhook", "name": "h"}]}, "url"),
        ({"surprise": 1}, "Extra inputs"),
    ],
)
def test_model_refuses_bad_specs_with_a_clear_message(patch, fragment):
    with pytest.raises(ValidationError) as e:
        BackfillSpec.model_validate({**SEED, **patch})
    assert fragment in str(e.value)
