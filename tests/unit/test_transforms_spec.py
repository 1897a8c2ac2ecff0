"""spec.transforms in the model (the CRD's schema, the REST API's body, the worker's input) and
in the Jobs the operator creates (docs/transforms.md)."""

from __future__ import annotations

import copy
import re

import pytest
from pydantic import ValidationError

from beam_contract.model import (
    TRANSFORM_DEFINITION_RE,
    TRANSFORM_SCRIPT_MAX_LENGTH,
    TRANSFORMS_MAX,
    BackfillSpec,
)
from beam_contract.worker import Env
from beam_operator import child_jobs, crd
from beam_operator.config import OperatorConfig

SPEC = {
    "job_name": "usdc",
    "table": "base.assets.erc20_token_transfers",
    "backfill_window": {"partition_key": "block", "start": 1, "end": 100},
    "destinations": [{"type": "kafka", "name": "t"}],
}
IDENTITY = {"type": "v8", "script": "function transform(row) { return row; }"}


def spec(**extra) -> BackfillSpec:
    return BackfillSpec.model_validate({**copy.deepcopy(SPEC), **extra})


def test_transforms_are_optional_and_kept_in_order():
    assert spec().transforms is None
    s = spec(transforms=[IDENTITY, {"type": "v8", "script": "const transform = (r) => ({...r, x: 1});"}])
    assert [t.script for t in s.transforms] == [IDENTITY["script"], "const transform = (r) => ({...r, x: 1});"]
    assert s.model_dump(mode="json", exclude_none=True)["transforms"][0] == IDENTITY


@pytest.mark.parametrize(
    "script",
    [
        "function transform(row) { return row; }",
        "function  transform (row) {}",
        "'use strict';\nconst rate = 2;\nfunction transform(r) { return r; }",
        "const transform = (r) => r;",
        "let transform=function (r) { return r; };",
        "var transform = r => null;",
        "/* function transform( in a comment passes here; the workers refuse it */",
    ],
)
def test_a_script_that_declares_transform_passes_the_textual_check(script):
    spec(transforms=[{"type": "v8", "script": script}])


@pytest.mark.parametrize(
    "script",
    [
        "function transformRow(row) { return row; }",
        "function mytransform(row) { return row; }",
        "obj.function transform(row) {}",
        "transform = function (row) { return row; };",
        "const transformer = (r) => r;",
        "return row;",
    ],
)
def test_a_script_that_does_not_declare_transform_is_refused(script):
    with pytest.raises(ValidationError, match="a transform script must define a function named transform"):
        spec(transforms=[{"type": "v8", "script": script}])


def test_limits_on_count_size_and_type():
    with pytest.raises(ValidationError, match=f"at most {TRANSFORMS_MAX} items"):
        spec(transforms=[IDENTITY] * (TRANSFORMS_MAX + 1))
    long = IDENTITY["script"] + " " * (TRANSFORM_SCRIPT_MAX_LENGTH - len(IDENTITY["script"]) + 1)
    with pytest.raises(ValidationError, match=f"at most {TRANSFORM_SCRIPT_MAX_LENGTH} characters"):
        spec(transforms=[{"type": "v8", "script": long}])
    spec(transforms=[{"type": "v8", "script": long[:-1]}])
    with pytest.raises(ValidationError):
        spec(transforms=[{"type": "quickjs", "script": IDENTITY["script"]}])
    with pytest.raises(ValidationError):
        spec(transforms=[{"type": "v8", "script": IDENTITY["script"], "timeout": 5}])


def test_the_crd_declares_the_same_limits_and_check():
    props = crd.spec_schema()["properties"]["transforms"]
    assert props["maxItems"] == TRANSFORMS_MAX and props["nullable"] is True
    script = props["items"]["properties"]["script"]
    assert script["maxLength"] == TRANSFORM_SCRIPT_MAX_LENGTH and script["minLength"] == 1
    (rule,) = script["x-kubernetes-validations"]
    assert rule["rule"] == f"self.matches(r'{TRANSFORM_DEFINITION_RE}')"
    assert props["items"]["properties"]["type"]["enum"] == ["v8"]
    # One regular expression for CEL (RE2) and Python: nothing in it that the two read differently.
    assert not re.search(r"\(\?|\\[pPkKzZAG]|\{\d*,\}", TRANSFORM_DEFINITION_RE)
    immutable = next(r for r in crd.spec_schema()["x-kubernetes-validations"] if "oldSelf" in r["rule"])
    assert "self.transforms == oldSelf.transforms" in immutable["rule"], "transforms cannot change after creation"


def test_workers_of_a_backfill_with_transforms_get_the_limits():
    config = OperatorConfig(transform_memory_mib=512, transform_timeout_seconds=2.5)

    def env(job) -> dict:
        (container,) = job["spec"]["template"]["spec"]["containers"]
        return {e["name"]: e.get("value") for e in container["env"]}

    with_t = spec(transforms=[IDENTITY])
    for job in (
        child_jobs.staging_job("usdc", "org", "uid-1", with_t, config),
        child_jobs.transport_job("usdc", "org", "uid-1", with_t, config, 3),
    ):
        e = env(job)
        assert e[Env.TRANSFORM_MEMORY_MIB] == "512" and e[Env.TRANSFORM_TIMEOUT_S] == "2.5"
    for job in (
        child_jobs.staging_job("usdc", "org", "uid-1", spec(), config),
        child_jobs.transport_job("usdc", "org", "uid-1", spec(), config, 3),
    ):
        assert Env.TRANSFORM_MEMORY_MIB not in env(job) and Env.TRANSFORM_TIMEOUT_S not in env(job)


def test_operator_limits_have_bounds():
    assert OperatorConfig().transform_memory_mib == 256 and OperatorConfig().transform_timeout_seconds == 10.0
    with pytest.raises(ValidationError):
        OperatorConfig(transform_memory_mib=8)
    with pytest.raises(ValidationError):
        OperatorConfig(transform_timeout_seconds=0)
