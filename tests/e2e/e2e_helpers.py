"""Helpers for the end-to-end tests (a module of its own: every test dir has a conftest)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from collections import Counter
from http.server import BaseHTTPRequestHandler
from pathlib import Path

from beam_devstack import dataset

WINDOW = {"partition_key": "block_timestamp", "start": "2026-03-01T00:00:00", "end": "2026-04-01T00:00:00"}

WEEK = {**WINDOW, "end": "2026-03-08T00:00:00"}
WETH = "0x4200000000000000000000000000000000000006"
# A transform that drops one token's rows and adds a field (docs/transforms.md).
DROP_WETH_AND_LABEL = {
    "type": "v8",
    "script": (
        "function transform(row) {\n"
        f'  if (row.token_address === "{WETH}") return null;\n'
        '  row.label = row.token_symbol + "#" + row.block_number;\n'
        "  return row;\n"
        "}\n"
    ),
}


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


API = "/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills/{name}"


def apply(k8s, ns, obj):
    k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))
    return k8s.api("GET", API.format(ns=ns, name=obj["metadata"]["name"]))


def status(k8s, ns, name):
    return k8s.api("GET", API.format(ns=ns, name=name)).get("status") or {}


def wait_status(k8s, ns, name, wanted, timeout=180, until=None):
    """Wait for one of the `wanted` statuses (and `until(status)` if given); a backfill that
    ends otherwise fails the test at once with its error_message."""
    wanted = {wanted} if isinstance(wanted, str) else set(wanted)
    deadline = time.monotonic() + timeout
    st = {}
    while time.monotonic() < deadline:
        st = status(k8s, ns, name)
        if st.get("status") in wanted and (until is None or until(st)):
            return st
        if st.get("status") in {"completed", "failed", "cancelled"} - wanted:
            raise AssertionError(f"{ns}/{name} ended {st['status']}: {st.get('error_message')}")
        time.sleep(0.2)
    raise AssertionError(f"{ns}/{name} not {wanted} after {timeout}s: {st}")


def jobs(k8s, ns, uid):
    return k8s.api("GET", f"/apis/batch/v1/namespaces/{ns}/jobs?labelSelector=beam-backfill.dev%2Fjob-id%3D{uid}")[
        "items"
    ]


def assert_exactly(messages, ids):
    keys = Counter(k for k, _ in messages)
    dupes = {k: n for k, n in keys.items() if n > 1}
    assert not dupes, f"{len(dupes)} keys delivered more than once, e.g. {list(dupes.items())[:3]}"
    assert set(keys) == ids, f"missing {len(ids - set(keys))}, unexpected {len(set(keys) - ids)}"


class Refuser(BaseHTTPRequestHandler):
    """A webhook receiver that refuses every batch (400, "unknown tenant"): a backfill that fails
    at its destination and keeps its staged files."""

    calls = 0

    def do_POST(self):
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).calls += 1
        body = b"unknown tenant"
        self.send_response(400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def failed_at_its_webhook(k8s, ns: str, name: str) -> str:
    """A one-day backfill whose webhook refuses every batch: it ends failed and keeps its
    staged files (for debugging, until it is deleted). Returns its uid."""
    import threading
    from http.server import ThreadingHTTPServer

    from beam_devstack.pytest_plugin import NODE

    server = ThreadingHTTPServer((NODE["node_ip"], 0), Refuser)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        obj = backfill(name, f"e2e-{name}", window={**WINDOW, "end": "2026-03-02T00:00:00"})
        url = f"http://{NODE['node_ip']}:{server.server_port}/beam"
        obj["spec"]["destinations"] = [{"type": "webhook", "name": "refuser", "url": url}]
        k8s.kubectl("apply", "-n", ns, "-f", "-", input=json.dumps(obj))
        uid = k8s.api("GET", API.format(ns=ns, name=name))["metadata"]["uid"]
        wait_status(k8s, ns, name, "failed")
        return uid
    finally:
        server.shutdown()


RELEASE_NS = "beam-system"
KEYS_NS = "beam-system-api-keys"  # the chart's default: <release namespace>-api-keys


def make_key(k8s, org: str) -> str:
    """A key for `org`, made the way docs/api.md tells an administrator to."""
    beam_api = Path(sys.executable).parent / "beam-api"
    done = subprocess.run(
        [str(beam_api), "--keys-namespace", KEYS_NS, "keys", "create", "--org", org, "--description", "e2e"],
        env={**os.environ, "KUBECONFIG": str(k8s.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()
