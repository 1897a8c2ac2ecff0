"""Webhook (HMAC-verifying receiver), NATS JetStream and SNS (read back through SQS) receive exactly the window."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow.fs as pafs
import pytest
from jr_helpers import Job, drain_queue, expected_ids, nats_stream, read_nats, sns_topic_to_queue

from beam_contract import staging

WINDOW = {"partition_key": "block", "start": 2000, "end": 2300}
KEY = "s3cr3t-hash-key"


def spec(dest: dict) -> dict:
    return {
        "job_name": "t",
        "table": "base.assets.erc20_token_transfers",
        "backfill_window": WINDOW,
        "destinations": [dest],
    }


class Receiver:
    """A webhook receiver as the docs tell users to write one: verify, reject stale, dedupe by key."""

    def __init__(self, key: str, fail_first: int = 0, tls=None) -> None:
        self.key = key.encode()
        self.rows: list[dict] = []
        self.keys: list[str] = []
        self.fail_first = fail_first
        self.requests = 0
        outer = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests += 1
                ts, nonce, sig = (
                    self.headers.get(h) for h in ("X-Webhook-Timestamp", "X-Webhook-Nonce", "X-Signature-256")
                )
                want = "sha256=" + hmac.new(outer.key, f"{nonce}.{ts}.".encode() + body, hashlib.sha256).hexdigest()
                if not (ts and nonce and sig) or not hmac.compare_digest(want, sig):
                    return self._answer(401, b'{"error":"bad signature"}')
                if abs(time.time() - int(ts)) > 300:
                    return self._answer(401, b'{"error":"stale"}')
                if outer.fail_first > 0:
                    outer.fail_first -= 1
                    return self._answer(503, b"try later")
                doc = json.loads(body)
                idem = self.headers["Idempotency-Key"]
                assert idem == f"{doc['job_id']}:{doc['chunk']}:{doc['batch']}"
                if idem not in outer.keys:
                    outer.keys.append(idem)
                    outer.rows.extend(doc["rows"])
                self._answer(200, b"{}")

            def _answer(self, code, body):
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        scheme = "http"
        if tls is not None:  # (certificate, key) files
            import ssl

            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(*tls)
            self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
            scheme = "https"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_port}/hook?token=abc"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_webhook_signed_batches_with_retry(tmp_path, source, bucket, gcs, rows):
    recv = Receiver(KEY, fail_first=2)
    try:
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hook", "url": recv.url, "hash_key": "hook-secret"}),
            snowflake=source,
            gcs=gcs,
            extra={"BEAM_DEST_0_HASH_KEY": KEY, "BEAM_WEBHOOK_BATCH_ROWS": "40"},
        )
        staged = job.stage().json
        job.transport_all(staged["num_chunks"])
        got = [r["unique_id"] for r in recv.rows]
        assert len(got) == len(set(got))
        assert set(got) == set(expected_ids(rows, blocks=(2000, 2300)))
        assert recv.rows[0]["block_timestamp"].endswith("Z")
        # A rerun of a delivered chunk sends nothing: its progress object is in GCS, and without
        # it (a worker killed between the two writes) the destination's own marker.
        before = recv.requests
        r = job.transport(0)
        assert r.code == 0 and r.json["skipped"] == 1 and recv.requests == before
        fs = pafs.GcsFileSystem(anonymous=True, endpoint_override=gcs.endpoints()["host_port"], scheme="http")
        fs.delete_file(staging.progress_uri(job.staging, 0).removeprefix("gs://"))
        r = job.transport(0)
        assert r.code == 0 and r.json["destinations"][0]["skipped"] == 1 and recv.requests == before
    finally:
        recv.close()


def test_webhook_4xx_fails_chunk_without_leaking_secrets(tmp_path, source, bucket, gcs):
    recv = Receiver("another-key")
    try:
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hook", "url": recv.url, "hash_key": "hook-secret"}),
            snowflake=source,
            gcs=gcs,
            extra={"BEAM_DEST_0_HASH_KEY": KEY},
        )
        job.stage()
        r = job.transport(0)
        assert r.code == 2
        assert "HTTP 401" in r.message and "bad signature" in r.message
        assert KEY not in r.message + r.stderr and "token=abc" not in r.message + r.stderr

        missing = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hook", "url": recv.url, "hash_key": "hook-secret"}),
            snowflake=source,
            gcs=gcs,
        )
        missing.stage()
        r = missing.transport(0)
        assert r.code == 2 and "hash_key missing" in r.message
    finally:
        recv.close()


def test_https_webhook_trusts_the_ca_of_its_secret_and_only_then(tmp_path, source, bucket, gcs, rows):
    from beam_devstack.substrate import pki

    ca, ca_key = pki.make_ca(tmp_path / "ca", "private-webhook-ca")
    recv = Receiver(KEY, tls=pki.issue_cert(tmp_path / "recv", ca, ca_key, "receiver", server=True, ips=("127.0.0.1",)))
    dest = {"type": "webhook", "name": "hook", "url": recv.url, "hash_key": "hook-secret"}
    try:

        def transport(**secret):
            job = Job(
                tmp_path,
                spec(dest),
                snowflake=source,
                gcs=gcs,
                extra={"BEAM_DEST_0_HASH_KEY": KEY, "BEAM_WEBHOOK_ATTEMPTS": "1", **secret},
            )
            job.stage()
            return job.transport(0)

        untrusted = transport()  # the public roots do not include the private CA
        assert untrusted.code != 0 and "CERTIFICATE_VERIFY_FAILED" in untrusted.message, untrusted.message
        assert recv.requests == 0
        garbled = transport(BEAM_DEST_0_SSL_CA_PEM="not a certificate")
        assert garbled.code == 2 and "ssl_ca_pem of Secret hook-secret is not a PEM CA certificate" in garbled.message
        trusted = transport(BEAM_DEST_0_SSL_CA_PEM=ca.read_text())
        assert trusted.code == 0, trusted.message
        assert {r["unique_id"] for r in recv.rows} <= set(expected_ids(rows, blocks=(2000, 2300))) and recv.rows
    finally:
        recv.close()


def test_nats_jetstream(tmp_path, source, bucket, gcs, nats, rows):
    subject = nats_stream(nats)
    job = Job(
        tmp_path, spec({"type": "nats", "name": subject, "url": nats.endpoints()["url"]}), snowflake=source, gcs=gcs
    )
    staged = job.stage().json
    job.transport_all(staged["num_chunks"])

    got = read_nats(nats, subject)
    ids = [doc["unique_id"] for _, doc in got]
    assert len(ids) == len(set(ids))
    assert set(ids) == set(expected_ids(rows, blocks=(2000, 2300)))
    assert all(mid == doc["unique_id"] for mid, doc in got)

    no_stream = Job(
        tmp_path,
        spec({"type": "nats", "name": "nobody.listens", "url": nats.endpoints()["url"]}),
        snowflake=source,
        gcs=gcs,
    )
    no_stream.stage()
    r = no_stream.transport(0)
    assert r.code == 2 and "no JetStream stream" in r.message


@pytest.mark.parametrize("fifo", [False, True])
def test_sns_via_sqs(tmp_path, source, bucket, gcs, sns, rows, fifo):
    arn, q = sns_topic_to_queue(sns, fifo=fifo)
    creds = {"BEAM_DEST_0_AWS_ACCESS_KEY_ID": "testing", "BEAM_DEST_0_AWS_SECRET_ACCESS_KEY": "testing"}
    job = Job(
        tmp_path,
        spec({"type": "sns", "name": "sns", "topic_arn": arn, "endpoint_url": sns.endpoints()["url"], "secret": "aws"}),
        snowflake=source,
        gcs=gcs,
        extra=creds,
    )
    staged = job.stage().json
    job.transport_all(staged["num_chunks"])

    got = [doc["unique_id"] for doc in drain_queue(sns, q)]
    assert len(got) == len(set(got))
    assert set(got) == set(expected_ids(rows, blocks=(2000, 2300)))


def test_a_failed_worker_leaves_its_last_log_lines_with_every_secret_masked(tmp_path, source, bucket, gcs):
    # A receiver that echoes the signing key in its refusal: the key must not reach the
    # termination message (the error or the log lines the operator copies into an Event).
    from beam_contract.worker import LOG_TAIL_MARK

    class Echo(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            body = f"unknown key {KEY}".encode()
            self.send_response(403)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        job = Job(
            tmp_path,
            spec({"type": "webhook", "name": "hook", "url": url, "hash_key": "beam-destination-hook"}),
            snowflake=source,
            gcs=gcs,
            extra={"BEAM_DEST_0_HASH_KEY": KEY},
        )
        job.stage()
        r = job.transport(0)
    finally:
        server.shutdown()
    assert r.code == 2
    assert "answered HTTP 403: unknown key ***" in r.message, r.termination
    assert r.termination.startswith(r.message + "\nfailed chunk: 0\n" + LOG_TAIL_MARK + "\n"), r.termination
    lines = r.log_tail
    assert 1 <= len(lines) <= 20 and any("beam_jobrunner" in line for line in lines), lines
    assert KEY not in r.termination and KEY not in r.stderr
    assert len(r.termination.encode()) <= 4096
    # The same lines still reach stderr (one JSON object each), which `kubectl logs` shows
    # while the Pod exists.
    logged = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    assert lines[-1].split(": ", 1)[1] in [rec["message"] for rec in logged], (lines[-1], r.stderr[-2000:])
    assert all(rec["job_id"] == job.job_id and rec["phase"] == "transport" for rec in logged if "level" in rec)
