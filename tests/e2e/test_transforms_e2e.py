"""spec.transforms on the real node (docs/transforms.md): the workers' V8 sandboxes in the
jobrunner image, applied by kubectl, delivered to Kafka (read_committed) and to a webhook."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from e2e_helpers import (
    API,
    DROP_WETH_AND_LABEL,
    WEEK,
    WETH,
    WINDOW,
    apply,
    assert_exactly,
    backfill,
    expected_ids,
    read_topic,
    status,
    wait_status,
)

from beam_devstack import dataset
from beam_devstack.pytest_plugin import NODE
from beam_devstack.substrate.proc import wait_for


def _both_tokens(name: str, topic: str, window=WINDOW, **spec) -> dict:
    obj = backfill(name, topic, window=window, **spec)
    obj["spec"]["filter"] = {"column": "token_address", "values": [dataset.USDC, WETH]}
    obj["spec"]["transforms"] = [DROP_WETH_AND_LABEL]
    return obj


def test_a_transform_that_adds_a_field_and_drops_a_token_delivers_exactly_the_rest_once(
    k8s, operator, kafka, seeded, org
):
    columns = ["unique_id", "block_number", "token_address", "token_symbol", "amount"]
    apply(k8s, org, _both_tokens("labelled", "e2e-labelled", parallelism=3, columns=columns))
    st = wait_status(k8s, org, "labelled", "completed", timeout=240)
    usdc, weth = expected_ids(seeded), expected_ids(seeded, token=WETH)
    assert usdc and weth
    # num_rows counts what was staged: both tokens; the transform dropped WETH's on the way out.
    assert st["num_rows"] == len(usdc) + len(weth), st
    msgs = read_topic(kafka.bootstrap, f"{org}.e2e-labelled")
    assert_exactly(msgs, usdc)
    for key, row in msgs:
        assert list(row) == [*columns, "label"], row
        assert row["unique_id"] == key and row["token_address"] == dataset.USDC
        assert row["label"] == f"{row['token_symbol']}#{row['block_number']}", row


class _FailsMidChunk(BaseHTTPRequestHandler):
    """Accepts every batch but answers 500 to batch 2 of the first chunk that has one, until
    fixed; records every POST's rows under its Idempotency-Key."""

    broken = True
    failing_chunk = None
    posts: dict = {}  # Idempotency-Key -> [(attempt, [unique_id, ...]), ...]

    def do_POST(self):
        doc = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        attempt = "broken" if cls.broken else "fixed"
        cls.posts.setdefault(self.headers["Idempotency-Key"], []).append(
            (attempt, [r["unique_id"] for r in doc["rows"]])
        )
        if cls.broken and doc["batch"] == 2 and cls.failing_chunk in (None, doc["chunk"]):
            cls.failing_chunk = doc["chunk"]
            self.send_response(500)
            self.send_header("Content-Length", "11")
            self.end_headers()
            self.wfile.write(b"disk full\n\n")
            return
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *a):
        pass


def test_a_transformed_webhook_delivery_keeps_its_idempotency_keys_across_a_retry(k8s, operator, seeded, org):
    cls = _FailsMidChunk
    cls.broken, cls.failing_chunk, cls.posts = True, None, {}
    server = ThreadingHTTPServer((NODE["node_ip"], 0), cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        obj = _both_tokens("hooked", "unused", window=WEEK, parallelism=1, backoff_limit_per_index=0)
        url = f"http://{NODE['node_ip']}:{server.server_port}/beam"
        obj["spec"]["destinations"] = [{"type": "webhook", "name": "hook", "url": url}]
        uid = apply(k8s, org, obj)["metadata"]["uid"]
        st = wait_status(k8s, org, "hooked", "failed", timeout=240)
        assert "HTTP 500: disk full" in st["error_message"], st
        chunk = cls.failing_chunk
        assert chunk is not None, "no chunk had three batches: the window is too small for this test"
        cls.broken = False
        k8s.api("PATCH", API.format(ns=org, name="hooked"), {"spec": {"retry": 1}})
        wait_for(lambda: status(k8s, org, "hooked").get("attempt") == 2, 60, "attempt 2 started")
        st = wait_status(k8s, org, "hooked", "completed", timeout=240)
    finally:
        server.shutdown()
    assert st["attempt"] == 2 and st["chunks_left"] == 0, st
    # The failed chunk's batches 0 and 1 reached the receiver in both attempts, under the same
    # keys and with the same rows: what the receiver deduplicates by.
    for batch in (0, 1):
        sent = cls.posts[f"{uid}:{chunk}:{batch}"]
        assert [a for a, _ in sent] == ["broken", "fixed"], sent
        assert sent[0][1] == sent[1][1], f"batch {batch} of chunk {chunk} carried other rows on the retry"
    # Every key always carried the same rows, and what the receiver kept (one body per key) is
    # exactly the window's USDC rows, each under one key.
    by_row: dict = defaultdict(set)
    for k, sent in cls.posts.items():
        assert all(ids == sent[0][1] for _, ids in sent), f"{k} carried different rows"
        for i in sent[0][1]:
            by_row[i].add(k)
    assert set(by_row) == expected_ids(seeded, WEEK), "rows missing or unexpected (WETH must be dropped)"
    assert max(len(keys) for keys in by_row.values()) == 1, "a row arrived under two idempotency keys"


def test_a_script_that_does_not_compile_fails_in_staging_before_any_row_is_staged(k8s, operator, bucket, org):
    obj = backfill("broken-js", "e2e-broken-js", window=WEEK)
    # It names `function transform(`, so the CRD's check passes; V8 in staging refuses it.
    obj["spec"]["transforms"] = [{"type": "v8", "script": "function transform(row) {\n  return row;;\n  }}\n"}]
    uid = apply(k8s, org, obj)["metadata"]["uid"]
    st = wait_status(k8s, org, "broken-js", "failed")
    msg = st["error_message"]
    assert "transform 1 of 1 does not compile: SyntaxError" in msg and "at line 3, column 4" in msg, msg
    assert not st.get("num_chunks"), st
    assert [b.name for b in bucket.client.list_blobs(bucket.name, prefix=f"backfills/{org}/{uid}/")] == []
    assert json.dumps(st).count("return row") == 0, "the script's text is not part of the status"
