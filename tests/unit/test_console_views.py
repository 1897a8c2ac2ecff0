"""The console's pure parts: the start form -> a create body, refusals -> fields, and what a
row shows of a backfill (rates, time left, the manifest for Git)."""

from __future__ import annotations

from datetime import UTC, datetime

import yaml
from pydantic import ValidationError

from beam_contract.model import BackfillSpec
from beam_operator.api.preview import DEFAULT_ROWS_PER_SECOND, FIXED_SECONDS, estimate
from beam_operator.api.public_job import field_path
from beam_operator.console import forms, views

FORM = {
    "table": "base.assets.erc20_token_transfers",
    "job_name": "n",
    "columns": "unique_id, block_timestamp",
    "filter_column": "block_number",
    "filter_values": "1\n2, 3",
    "filter_kind": "integer",
    "partition_key": "block",
    "start": "10",
    "end": "20",
    "dest-0-type": "",
    "dest-1-type": "kafka-external",
    "dest-1-name": "t",
    "dest-1-bootstrap_servers": "kafka.example.com:9092",
    "dest-1-secret": "beam-dest-kafka",
    "dest-1-url": "ignored: not a field of this type",
}


def test_the_form_becomes_the_create_body():
    body, slots = forms.body_of(FORM)
    assert body == {
        "job_name": "n",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {"partition_key": "block", "start": 10, "end": 20},
        "filter": {"column": "block_number", "values": [1, 2, 3]},
        "columns": ["unique_id", "block_timestamp"],
        "destinations": [
            {"type": "kafka", "name": "t", "bootstrap_servers": "kafka.example.com:9092", "secret": "beam-dest-kafka"}
        ],
    }
    assert slots == [1]
    BackfillSpec.model_validate(body)


def test_each_refusal_lands_next_to_the_field_it_names():
    body, slots = forms.body_of({**FORM, "dest-1-name": "has space", "start": "30", "job_name": ""})
    try:
        BackfillSpec.model_validate(body)
    except ValidationError as e:
        detail = [{"field": field_path(err["loc"]), "msg": err["msg"]} for err in e.errors()]
    errors = forms.errors_by_field(detail, slots)
    assert set(errors) == {"job_name", "window", "dest-1-name"}, errors
    assert errors["window"] == ["backfill_window.start (30) must be less than end (20)"]
    # the apiserver's causes name spec fields the same way
    assert forms.field_of({"field": "backfill_window.end"}) == "end"
    assert forms.field_of({"field": "filter.values"}) == "filter_values"
    assert forms.field_of({"field": "destinations.0.url"}, [2]) == "dest-2-url"


def test_step_4s_script_is_the_one_transform_and_its_refusal_lands_under_it():
    body, _ = forms.body_of({**FORM, "transform_script": "function transform(r) {\r\n  return r;\r\n}"})
    assert body["transforms"] == [{"type": "v8", "script": "function transform(r) {\n  return r;\n}"}]
    assert "transforms" not in forms.body_of({**FORM, "transform_script": "  \n"})[0]
    body, slots = forms.body_of({**FORM, "transform_script": "return row;"})
    try:
        BackfillSpec.model_validate(body)
    except ValidationError as e:
        detail = [{"field": field_path(err["loc"]), "msg": err["msg"]} for err in e.errors()]
    errors = forms.errors_by_field(detail, slots)
    assert list(errors) == ["transform_script"], errors
    assert "must define a function named transform" in errors["transform_script"][0]


def test_a_row_shows_rate_and_time_left_from_the_status():
    now = datetime(2026, 3, 1, 0, 1, 40, tzinfo=UTC)
    obj = {
        "metadata": {"uid": "u", "name": "b", "namespace": "o", "creationTimestamp": "2026-03-01T00:00:00Z"},
        "spec": {"job_name": "j", "table": "t", "backfill_window": {"partition_key": "block", "start": 1, "end": 2}},
        "status": {
            "status": "transporting",
            "num_chunks": 10,
            "chunks_left": 4,
            "num_rows": 10_000,
            "rows_delivered": 6_000,
            "time_transporting_started": "2026-03-01T00:00:40Z",
        },
    }
    row = views.progress_view(obj, now)
    assert (row["chunks_done"], row["rows_per_second"], row["seconds_left"], row["elapsed_seconds"]) == (
        6,
        100.0,
        40.0,
        100.0,
    )
    assert views.actions(obj) == ["cancel", "suspend"]
    ended = {**obj, "status": {**obj["status"], "status": "failed", "time_completed": "2026-03-01T00:01:00Z"}}
    assert views.progress_view(ended, now)["seconds_left"] is None and views.actions(ended) == ["retry"]


def test_the_manifest_is_what_git_should_hold():
    obj = {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {
            "name": "b",
            "namespace": "o",
            "uid": "u",
            "resourceVersion": "7",
            "managedFields": [{}],
            "annotations": {"beam-backfill.dev/created-at": "x", "team": "data"},
            "labels": {"app.kubernetes.io/created-by": "beam-api"},
        },
        "spec": {"job_name": "j"},
        "status": {"status": "completed"},
    }
    assert yaml.safe_load(views.manifest_yaml(obj)) == {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": "b", "namespace": "o", "annotations": {"team": "data"}},
        "spec": {"job_name": "j"},
    }


def test_the_duration_estimate_uses_the_organizations_own_rate():
    seconds, basis = estimate(200_000, [])
    assert seconds == round(FIXED_SECONDS + 200_000 / DEFAULT_ROWS_PER_SECOND, 1) and "no completed backfill" in basis
    done = {
        "metadata": {"creationTimestamp": "2026-03-01T00:00:00Z"},
        "status": {"status": "completed", "num_rows": 1000, "time_completed": "2026-03-01T00:00:20Z"},
    }
    seconds, basis = estimate(1000, [done])
    assert seconds == FIXED_SECONDS + 10.0 and "last 1 completed backfill" in basis
