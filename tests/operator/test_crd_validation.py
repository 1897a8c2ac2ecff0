"""Every CEL and OpenAPI rule of the CRD, exercised on the real API server.

Each bad object is refused at create time with a message a user can act on, and nothing is
stored. The messages asserted here are the ones `kubectl apply` prints.
"""

from __future__ import annotations

import copy
import json

import pytest

from beam_devstack.substrate.k8s import ApiError

BASE = {
    "apiVersion": "beam-backfill.dev/v1alpha1",
    "kind": "BeamBackfill",
    "metadata": {"name": "usdc"},
    "spec": {
        "job_name": "USDC transfers on Base — Mar 2026",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": {
            "partition_key": "block_timestamp",
            "start": "2026-03-01T00:00:00",
            "end": "2026-04-01T00:00:00",
        },
        "filter": {"column": "token_address", "values": ["0x833589fcd6edb6e08f4c7c32d4f71b54bda02913"]},
        "destinations": [{"type": "kafka", "name": "base-usdc-transfers-backfill"}],
    },
}


def with_spec(**patch):
    obj = copy.deepcopy(BASE)
    obj["spec"].update(patch)
    return obj


def window(pk, start, end):
    return {"partition_key": pk, "start": start, "end": end}


def create(k8s, ns, obj):
    return k8s.api("POST", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills", obj)


def test_seed_examples_are_accepted(k8s, crd_installed, namespace):
    create(k8s, namespace, BASE)
    block = with_spec(backfill_window=window("block", 18_000_000, 18_100_000), static_egress_ip=False)
    block["metadata"]["name"] = "by-block"
    create(k8s, namespace, block)
    out = k8s.kubectl("get", "bbf", "-n", namespace, "-o", "json")
    names = sorted(i["metadata"]["name"] for i in json.loads(out.stdout)["items"])
    assert names == ["by-block", "usdc"]
    # defaults filled in by the schema
    got = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/usdc")
    assert got["spec"]["static_egress_ip"] is False and got["spec"]["cancel"] is False


def test_transforms_are_accepted_and_immutable(k8s, crd_installed, namespace):
    scripts = [
        "function transform(row) {\n  row.label = row.token_symbol;\n  return row;\n}",
        "const transform = (row) => row.amount > 0 ? row : null;",
    ]
    obj = with_spec(transforms=[{"type": "v8", "script": s} for s in scripts])
    # the largest the CRD takes, to show CEL's cost budget holds it
    obj["spec"]["transforms"].append({"type": "v8", "script": "function transform(r) { return r; }".ljust(32768)})
    obj["spec"]["transforms"].append(obj["spec"]["transforms"][-1])
    create(k8s, namespace, obj)
    path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/usdc"
    assert [t["script"] for t in k8s.api("GET", path)["spec"]["transforms"][:2]] == scripts
    with pytest.raises(ApiError) as e:
        k8s.api("PATCH", path, {"spec": {"transforms": [{"type": "v8", "script": scripts[1]}]}})
    assert "spec is immutable after creation" in e.value.body


BAD = [
    (
        "start after end",
        with_spec(backfill_window=window("block_timestamp", "2026-04-01T00:00:00", "2026-03-01T00:00:00")),
        "backfill_window.start must be before end",
    ),
    (
        "start equals end (blocks)",
        with_spec(backfill_window=window("block", 100, 100)),
        "backfill_window.start must be less than end",
    ),
    (
        "mixed offsets compared as instants",
        with_spec(backfill_window=window("block_timestamp", "2026-03-01T02:00:00+02:00", "2026-03-01T00:00:00Z")),
        "backfill_window.start must be before end",
    ),
    (
        "not ISO 8601",
        with_spec(backfill_window=window("block_timestamp", "March 1st 2026", "2026-04-01T00:00:00")),
        "start and end must be ISO 8601 timestamps",
    ),
    # Windows CEL would take but pydantic or the worker's datetime arithmetic could not hold.
    *[
        (case, with_spec(backfill_window=window("block_timestamp", start, end)), message)
        for case, start, end, message in [
            ("under a microsecond", "2026-03-01T00:00:00.0000001", "2026-03-01T00:00:00.0000002", "up to 6 fractional"),
            ("year 1 with an offset", "0001-01-01T00:00:00+01:00", "2026-04-01T00:00:00", "the years 1970-2999"),
            ("year 9999 with an offset", "2026-03-01T00:00:00", "9999-12-31T23:00:00-02:00", "the years 1970-2999"),
        ]
    ],
    (
        "timestamps for a block window",
        with_spec(backfill_window=window("block", "2026-03-01T00:00:00", "2026-04-01T00:00:00")),
        "for partition_key block, start and end must be integer block heights",
    ),
    (
        "integers for a timestamp window",
        with_spec(backfill_window=window("block_timestamp", 1, 2)),
        "for partition_key block_timestamp, start and end must be ISO 8601 strings",
    ),
    (
        "unknown partition key",
        with_spec(backfill_window=window("slot", 1, 2)),
        'supported values: "block_timestamp", "block"',
    ),
    ("no destination", with_spec(destinations=[]), "should have at least 1 items"),
    (
        "empty filter values",
        with_spec(filter={"column": "token_address", "values": []}),
        "should have at least 1 items",
    ),
    (
        "column not an identifier",
        with_spec(filter={"column": "token_address) OR (1=1", "values": ["x"]}),
        "spec.filter.column",
    ),
    ("projection column not an identifier", with_spec(columns=["amount", "1; drop"]), "spec.columns[1]"),
    ("table not an identifier", with_spec(table="base.assets.t; DROP TABLE x"), "spec.table"),
    (
        "webhook without url",
        with_spec(destinations=[{"type": "webhook", "name": "hook"}]),
        "url is required when type is webhook",
    ),
    (
        "sns without arn",
        with_spec(destinations=[{"type": "sns", "name": "s"}]),
        "topic_arn is required when type is sns",
    ),
    (
        "field of another type",
        with_spec(destinations=[{"type": "kafka", "name": "t", "url": "https://x"}]),
        "url is only valid when type is webhook or nats",
    ),
    (
        "kafka topic with spaces",
        with_spec(destinations=[{"type": "kafka", "name": "my topic"}]),
        "name of a kafka destination must match",
    ),
    (
        "duplicate destination",
        with_spec(destinations=[{"type": "kafka", "name": "t"}, {"type": "kafka", "name": "t"}]),
        "each destination (type and name) may be listed only once",
    ),
    (
        "unknown destination type",
        with_spec(destinations=[{"type": "pubsub", "name": "t"}]),
        'supported values: "kafka", "webhook", "nats", "sns"',
    ),
    ("parallelism out of range", with_spec(parallelism=0), "should be greater than or equal to 1"),
    ("nats without url", with_spec(destinations=[{"type": "nats", "name": "s"}]), "url is required when type is nats"),
    (
        "bootstrap_servers on a webhook",
        with_spec(destinations=[{"type": "webhook", "name": "h", "url": "https://x", "bootstrap_servers": "k:9092"}]),
        "bootstrap_servers is only valid when type is kafka",
    ),
    (
        "secret on a webhook",
        with_spec(destinations=[{"type": "webhook", "name": "h", "url": "https://x", "secret": "s"}]),
        "secret is only valid when type is kafka or nats or sns",
    ),
    (
        "hash_key on kafka",
        with_spec(destinations=[{"type": "kafka", "name": "t", "hash_key": "k"}]),
        "hash_key is only valid when type is webhook",
    ),
    (
        "topic_arn on nats",
        with_spec(
            destinations=[
                {
                    "type": "nats",
                    "name": "s",
                    "url": "nats://n:4222",
                    "topic_arn": "arn:aws:sns:us-east-1:123456789012:t",
                }
            ]
        ),
        "topic_arn is only valid when type is sns",
    ),
    (
        "region on kafka",
        with_spec(destinations=[{"type": "kafka", "name": "t", "region": "us-east-1"}]),
        "region is only valid when type is sns",
    ),
    (
        "endpoint_url on kafka",
        with_spec(destinations=[{"type": "kafka", "name": "t", "endpoint_url": "http://x"}]),
        "endpoint_url is only valid when type is sns",
    ),
    (
        "webhook url not http",
        with_spec(destinations=[{"type": "webhook", "name": "h", "url": "ftp://x"}]),
        "url of a webhook destination must match",
    ),
    (
        "nats subject with spaces",
        with_spec(destinations=[{"type": "nats", "name": "a b", "url": "nats://n:4222"}]),
        "name of a nats destination must match",
    ),
    (
        "nats url not nats://",
        with_spec(destinations=[{"type": "nats", "name": "s", "url": "http://n:4222"}]),
        "url of a nats destination must match",
    ),
    (
        "filter value over 1024 characters",
        with_spec(filter={"column": "token_address", "values": ["0x" + "a" * 1023]}),
        "spec.filter.values[0]: Too long: may not be more than 1024",
    ),
    (
        "resources not a quantity",
        with_spec(resources={"limits": {"memory": "lots"}}),
        "spec.resources.limits.memory in body should match",
    ),
    (
        "backoff_limit_per_index negative",
        with_spec(backoff_limit_per_index=-1),
        "spec.backoff_limit_per_index in body should be greater than or equal to 0",
    ),
    (
        "sns arn malformed",
        with_spec(destinations=[{"type": "sns", "name": "s", "topic_arn": "arn:aws:sqs:x"}]),
        "spec.destinations[0].topic_arn",
    ),
    # spec.transforms (docs/transforms.md): the textual check; the workers compile them.
    (
        "transform script without a transform function",
        with_spec(transforms=[{"type": "v8", "script": "function transformRow(row) { return row; }"}]),
        "a transform script must define a function named transform",
    ),
    (
        "transform of another engine",
        with_spec(transforms=[{"type": "lua", "script": "function transform(row) { return row; }"}]),
        'spec.transforms[0].type: Unsupported value: "lua"',
    ),
    (
        "too many transforms",
        with_spec(transforms=[{"type": "v8", "script": "function transform(r) { return r; }"}] * 5),
        "spec.transforms: Too many: 5: must have at most 4 items",
    ),
    (
        "transform script over 32768 characters",
        with_spec(transforms=[{"type": "v8", "script": "function transform(r) { return r; }" + " " * 32768}]),
        "spec.transforms[0].script: Too long: may not be more than 32768",
    ),
]


@pytest.mark.parametrize("case, obj, message", BAD, ids=[b[0] for b in BAD])
def test_bad_specs_are_refused_with_a_clear_message(k8s, crd_installed, namespace, case, obj, message):
    with pytest.raises(ApiError) as e:
        create(k8s, namespace, obj)
    assert e.value.status == 422, e.value.body
    assert message in json.loads(e.value.body)["message"], json.loads(e.value.body)["message"]
    assert k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills")["items"] == []


def test_unknown_fields_are_refused_by_kubectl(k8s, crd_installed, namespace):
    obj = with_spec(surprise=True)
    out = k8s.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(obj), check=False)
    assert out.returncode != 0
    assert 'unknown field "spec.surprise"' in out.stderr


def test_spec_is_immutable_except_cancel_suspend_and_ttl(k8s, crd_installed, namespace):
    create(k8s, namespace, BASE)
    path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/usdc"
    for patch in (
        {"job_name": "renamed"},
        {"table": "base.assets.other"},
        {"filter": None},
        {"destinations": [{"type": "kafka", "name": "other"}]},
        {"columns": ["amount"]},
    ):
        with pytest.raises(ApiError) as e:
            k8s.api("PATCH", path, {"spec": patch})
        assert (
            "spec is immutable after creation, except cancel, suspend, retry and ttl_seconds_after_finished"
            in e.value.body
        ), patch
    k8s.api("PATCH", path, {"spec": {"suspend": True}})
    k8s.api("PATCH", path, {"spec": {"suspend": False}})
    k8s.api("PATCH", path, {"spec": {"ttl_seconds_after_finished": 600}})
    k8s.api("PATCH", path, {"spec": {"cancel": True}})
    got = k8s.api("GET", path)["spec"]
    assert got["cancel"] is True and got["suspend"] is False


def test_kubectl_explain_reads_from_the_model(k8s, crd_installed):
    out = k8s.kubectl("explain", "beambackfill.spec.backfill_window").stdout
    assert "start is inclusive, end exclusive" in out
    out = k8s.kubectl("explain", "beambackfill.spec.destinations.hash_key").stdout
    assert "HMAC-SHA256" in out
