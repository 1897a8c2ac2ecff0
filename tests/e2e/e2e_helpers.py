"""Helpers for the end-to-end tests (a module of its own: every test dir has a conftest)."""

from __future__ import annotations

import json
import time
import urllib.parse
import uuid

from beam_devstack import dataset

WINDOW = {"partition_key": "block_timestamp", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}


def expected_ids(conn, window=WINDOW, token=dataset.USDC) -> set[str]:
    return dataset.expected_ids(conn, window, token)


def read_topic(bootstrap: str, topic: str, *, idle: float = 3.0) -> list[tuple[str, dict]]:
    """Every committed message of `topic` (read_committed), as (key, value)."""
    from confluent_kafka import Consumer, KafkaException

    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"e2e-{uuid.uuid4()}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        try:
            md = c.list_topics(topic, timeout=10)
        except KafkaException:
            return []
        if topic not in md.topics or md.topics[topic].error is not None:
            return []
        c.subscribe([topic])
        out, last = [], time.monotonic()
        while time.monotonic() - last < idle:
            for m in c.consume(5000, timeout=0.5):
                if m.error():
                    continue
                out.append((m.key().decode(), json.loads(m.value())))
                last = time.monotonic()
        return out
    finally:
        c.close()


def backfill(name: str, topic: str, window=WINDOW, **spec) -> dict:
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": name},
        "spec": {
            "job_name": f"e2e {name}",
            "table": dataset.TABLE,
            "backfill_window": window,
            "filter": {"column": "token_address", "values": [dataset.USDC]},
            "destinations": [{"type": "kafka", "name": topic}],
            **spec,
        },
    }


def staged_objects(bucket, namespace: str, uid: str) -> list[str]:
    return [b.name for b in bucket.client.list_blobs(bucket.name, prefix=f"backfills/{namespace}/{uid}/")]


def pods_of(k8s, namespace: str, uid: str) -> list[dict]:
    sel = urllib.parse.quote(f"beam-backfill.dev/job-id={uid}")
    return k8s.api("GET", f"/api/v1/namespaces/{namespace}/pods?labelSelector={sel}")["items"]
