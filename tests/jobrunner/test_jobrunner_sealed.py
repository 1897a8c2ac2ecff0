"""Staged data sealed per backfill (jobrunner/beam_jobrunner/seal.py, docs/security.md "Staged
data"): another organization's Pod, which shares the bucket and the workers' identity but not the
backfill's key, reads only ciphertext, and whatever it writes there (a chunk, the manifest, a
delivery marker, a progress object) is refused or not believed, never delivered or skipped."""

from __future__ import annotations

import io
import json
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from jr_helpers import Job, expected_ids, managed

from beam_contract import staging
from beam_devstack.substrate.kafka import consume_all

WINDOW = {"partition_key": "block", "start": 1000, "end": 2000}


def spec(dest: dict) -> dict:
    return {
        "job_name": "sealed",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": WINDOW,
        "destinations": [dest],
    }


def _fs(gcs) -> pafs.GcsFileSystem:
    return pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")


def _read(gcs, uri: str) -> bytes:
    with _fs(gcs).open_input_stream(uri.removeprefix("gs://")) as f:
        return f.read()


def _write(gcs, uri: str, data: bytes) -> None:
    with _fs(gcs).open_output_stream(uri.removeprefix("gs://")) as f:
        f.write(data)


def _parquet(rows: list[dict]) -> bytes:
    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def test_a_staged_chunk_is_ciphertext_and_a_replaced_one_fails_instead_of_being_delivered(
    tmp_path, source, bucket, gcs, kafka, rows
):
    topic = f"sealed-{uuid.uuid4().hex[:8]}"
    job = Job(tmp_path, spec({"type": "kafka", "name": topic}), snowflake=source, gcs=gcs, kafka=kafka)
    manifest = json.loads(_read(gcs, job.stage().json["manifest"]))
    assert manifest["sealed"] is True and manifest["mac"]
    chunk = manifest["chunks"][0]["uri"]
    raw = _read(gcs, chunk)
    # What a Pod of another organization gets with the shared identity: no parquet, no rows.
    with pytest.raises(pa.ArrowInvalid):
        pq.read_table(io.BytesIO(raw))
    assert b"0x833589fcd6edb6e08f4c7c32d4f71b54bda02913" not in raw
    # It replaces the chunk with rows of its own: the transport worker refuses it.
    _write(gcs, chunk, _parquet([{"unique_id": "forged", "amount": 1}]))
    r = job.transport(0)
    assert r.code == 2, (r.message, r.stderr[-2000:])
    assert r.message.startswith(
        "storage: staged chunks/chunk-00000.parquet was not written by this backfill's staging worker"
    ), r.message
    assert consume_all(kafka.bootstrap, managed(topic)) == []
    # It rewrites the manifest (one chunk fewer): refused as well.
    _write(gcs, staging.manifest_uri(job.staging), json.dumps({**manifest, "chunks": manifest["chunks"][1:]}).encode())
    r = job.transport(0)
    assert r.code == 2 and "the manifest" in r.message and "was not written by this backfill's staging" in r.message


def test_forged_progress_and_markers_skip_nothing(tmp_path, source, bucket, gcs, kafka, rows):
    """Another organization's Pod writes a progress object and a webhook delivery marker for
    every chunk: neither is believed, every row reaches both destinations."""
    received: list[str] = []

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self):
            received.extend(
                r["unique_id"] for r in json.loads(self.rfile.read(int(self.headers["Content-Length"])))["rows"]
            )
            self.send_response(200)
            self.end_headers()

        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        topic = f"sealed-{uuid.uuid4().hex[:8]}"
        hook = {"type": "webhook", "name": "hook", "url": f"http://127.0.0.1:{server.server_port}/beam"}
        job = Job(
            tmp_path,
            {**spec({"type": "kafka", "name": topic}), "destinations": [{"type": "kafka", "name": topic}, hook]},
            snowflake=source,
            gcs=gcs,
            kafka=kafka,
        )
        n = job.stage().json["num_chunks"]
        for i in range(n):
            forged = {"chunk": i, "worker": 0, "rows": 1, "time": "2026-01-01T00:00:00Z", "mac": "0" * 64}
            _write(gcs, staging.progress_uri(job.staging, i), json.dumps(forged).encode())
            _write(
                gcs, staging.delivered_marker_uri(job.staging, 1, i), json.dumps({**forged, "destination": 1}).encode()
            )
        job.transport_all(n)
        want = sorted(expected_ids(rows, blocks=(1000, 2000)))
        assert sorted(m.key().decode() for m in consume_all(kafka.bootstrap, managed(topic))) == want
        assert sorted(received) == want
    finally:
        server.shutdown()
