"""The start form's fields -> a create body, and refusals -> messages next to their fields.

The form only reshapes what a person typed into the REST create body; the body is then judged
by the same model (BackfillSpec) and the same apiserver (CRD schema and CEL) as any other, and
each refusal is shown next to the field it names, in the words the API would use.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

DESTINATION_SLOTS = 3
# The product's five sink kinds; "kafka" with or without bootstrap_servers is one type in the spec.
SINKS = {
    "kafka": "Kafka (managed)",
    "kafka-external": "Kafka (your cluster)",
    "webhook": "Webhook",
    "nats": "NATS JetStream",
    "sns": "Amazon SNS",
}
SINK_FIELDS = {
    "kafka": ("name",),
    "kafka-external": ("name", "bootstrap_servers", "secret"),
    "webhook": ("name", "url", "hash_key"),
    "nats": ("name", "url", "secret"),
    "sns": ("name", "topic_arn", "region", "endpoint_url", "secret"),
}
_SPLIT = re.compile(r"[\s,]+")


def defaults(now: datetime | None = None) -> dict[str, str]:
    """The product's window defaults: from three months ago to now (whole minutes, UTC)."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    start = (now - timedelta(days=91)).replace(hour=0, minute=0)
    return {
        "partition_key": "block_timestamp",
        "start": start.strftime("%Y-%m-%dT%H:%M:%S"),
        "end": now.strftime("%Y-%m-%dT%H:%M:%S"),
        "filter_kind": "text",
        "dest-0-type": "kafka",
    }


def values_of(text: str, kind: str) -> list[str | int]:
    out: list[str | int] = []
    for v in _SPLIT.split(text.strip()):
        if not v:
            continue
        out.append(int(v) if kind == "integer" and re.fullmatch(r"-?\d+", v) else v)
    return out


def _bound(value: str, partition_key: str) -> str | int:
    value = value.strip()
    return int(value) if partition_key == "block" and re.fullmatch(r"\d+", value) else value


def source_of(form: Mapping[str, str]) -> dict[str, Any]:
    """table, window, filter, columns and the transform: a preview's spec (and half of a create body)."""
    pk = form.get("partition_key", "block_timestamp")
    body: dict[str, Any] = {
        "table": form.get("table", "").strip(),
        "backfill_window": {
            "partition_key": pk,
            "start": _bound(form.get("start", ""), pk),
            "end": _bound(form.get("end", ""), pk),
        },
    }
    column, values = form.get("filter_column", "").strip(), form.get("filter_values", "")
    if column or values.strip():
        body["filter"] = {"column": column, "values": values_of(values, form.get("filter_kind", "text"))}
    columns = [c for c in _SPLIT.split(form.get("columns", "").strip()) if c]
    if columns:
        body["columns"] = columns
    script = form.get("transform_script", "").replace("\r\n", "\n")
    if script.strip():  # the console offers one transform; the API takes up to four
        body["transforms"] = [{"type": "v8", "script": script}]
    return body


def body_of(form: Mapping[str, str]) -> tuple[dict[str, Any], list[int]]:
    """The create body, and for each of its destinations the form's slot it came from."""
    body = {"job_name": form.get("job_name", "").strip(), **source_of(form)}
    destinations, slots = [], []
    for slot in range(DESTINATION_SLOTS):
        kind = form.get(f"dest-{slot}-type", "")
        if kind not in SINKS:
            continue
        d: dict[str, Any] = {"type": "kafka" if kind.startswith("kafka") else kind}
        for f in SINK_FIELDS[kind]:
            v = form.get(f"dest-{slot}-{f}", "").strip()
            if v:
                d[f] = v
        destinations.append(d)
        slots.append(slot)
    body["destinations"] = destinations
    if form.get("static_egress_ip") == "on":
        body["static_egress_ip"] = True
    return body, slots


def field_of(item: dict[str, Any], slots: list[int] = ()) -> str:
    """The form field an API 422 item names (its `field`: destinations.0.name and the like)."""
    field = item.get("field") or ""
    m = re.fullmatch(r"destinations\.(\d+)(?:\.(\w+))?", field)
    if m:
        i = int(m.group(1))
        slot = slots[i] if i < len(slots) else i
        return f"dest-{slot}-{m.group(2) or 'type'}"
    if field == "destinations":
        return "dest-0-type"
    if field.startswith("backfill_window."):
        return field.split(".", 1)[1] if field.split(".", 1)[1] in ("start", "end", "partition_key") else "window"
    if field == "backfill_window":
        return "window"
    if field.startswith("filter."):
        return "filter_" + field.split(".")[1]
    if field.startswith("columns"):
        return "columns"
    if field.startswith("transforms"):
        return "transform_script"
    return field or "form"


def errors_by_field(detail: list[dict[str, Any]], slots: list[int] = ()) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in detail:
        msg = str(item.get("msg", "")).removeprefix("Value error, ")
        out.setdefault(field_of(item, slots), []).append(msg)
    return out
