"""Webhook: JSON batches POSTed to the destination's URL, HMAC-signed when it has a hash_key.

Body: {"job_id": ..., "chunk": <int>, "batch": <int>, "rows": [<row>, ...]}, at most
BEAM_WEBHOOK_BATCH_ROWS rows (default 500). Signature per the public docs: X-Webhook-Timestamp
(unix seconds), X-Webhook-Nonce (UUID v4), X-Signature-256: sha256=<hex of HMAC-SHA256 over
"<nonce>.<timestamp>.<body>">; timestamp and nonce are fresh on every attempt so a retry is
never stale. Idempotency-Key: <job_id>:<chunk>:<batch> is the same on every attempt and on a
rerun of the chunk: receivers deduplicate by it (at-least-once delivery).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import ssl
import time
import uuid
from collections.abc import Iterable

import httpx

from beam_jobrunner.errors import PermanentError, TransientError, excerpt
from beam_jobrunner.sinks import Batch, Sink, markers, redact_url

log = logging.getLogger("beam_jobrunner.webhook")

BATCH_ROWS = int(os.environ.get("BEAM_WEBHOOK_BATCH_ROWS", "500"))
ATTEMPTS = int(os.environ.get("BEAM_WEBHOOK_ATTEMPTS", "6"))
RETRY_STATUSES = {408, 425, 429}
ERROR_BODY_BYTES = 4096  # of an error answer, read to quote its start


def sign(key: bytes, nonce: str, timestamp: str, body: bytes) -> str:
    return (
        "sha256=" + hmac.new(key, nonce.encode() + b"." + timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
    )


class WebhookSink(Sink):
    def open(self) -> None:
        self.key = self.require_secret("hash_key").encode() if self.dest.hash_key else None
        self.url = self.dest.url
        self.where = redact_url(self.url)
        t = self.ctx.connect_timeout
        ca = self.secret("ssl_ca_pem") if self.dest.hash_key else None
        # A private CA is trusted alone, for this destination only, as Kafka's ssl.ca.pem is.
        try:
            verify = ssl.create_default_context(cadata=ca) if ca else True
        except (ssl.SSLError, ValueError) as e:
            raise PermanentError(
                f"{self.label}: ssl_ca_pem of Secret {self.dest.hash_key} is not a PEM CA certificate ({e})"
            ) from None
        self.client = httpx.Client(timeout=httpx.Timeout(max(t, 30), connect=t), follow_redirects=False, verify=verify)

    def already_delivered(self) -> bool:
        return markers.is_delivered(self.ctx)

    def _post(self, batch_no: int, body: bytes) -> None:
        headers = {
            "Content-Type": "application/json",
            "Idempotency-Key": f"{self.ctx.job_id}:{self.ctx.chunk}:{batch_no}",
        }
        delay = 0.5
        for attempt in range(1, ATTEMPTS + 1):
            if self.key is not None:
                ts, nonce = str(int(time.time())), str(uuid.uuid4())
                headers.update(
                    {
                        "X-Webhook-Timestamp": ts,
                        "X-Webhook-Nonce": nonce,
                        "X-Signature-256": sign(self.key, nonce, ts, body),
                    }
                )
            try:
                status, text = self._send(body, headers)
            except httpx.TransportError as e:
                why = f"{type(e).__name__} {excerpt(str(e))}".strip()
            else:
                if status < 300:
                    return
                if 400 <= status < 500 and status not in RETRY_STATUSES:
                    raise PermanentError(f"{self.label} batch {batch_no}: {self.where} answered HTTP {status}: {text}")
                why = f"HTTP {status}: {text}"
            if attempt == ATTEMPTS:
                raise TransientError(
                    f"{self.label} batch {batch_no}: {self.where} failed after {ATTEMPTS} attempts: {why}"
                )
            log.warning("%s batch %d attempt %d: %s; retrying in %.1fs", self.label, batch_no, attempt, why, delay)
            time.sleep(delay)
            delay = min(delay * 2, 10)

    def _send(self, body: bytes, headers: dict) -> tuple[int, str]:
        """POST once: the status, and for an error a short excerpt of the answer (errors.excerpt);
        an error answer is read no further than ERROR_BODY_BYTES."""
        with self.client.stream("POST", self.url, content=body, headers=headers) as r:
            if r.status_code < 300:
                r.read()  # drained, so the connection is kept for the next batch
                return r.status_code, ""
            head = b""
            for part in r.iter_bytes():
                head += part
                if len(head) >= ERROR_BODY_BYTES:
                    break
            try:
                text = head[:ERROR_BODY_BYTES].decode(r.charset_encoding or "utf-8", "replace")
            except LookupError:
                text = head[:ERROR_BODY_BYTES].decode("utf-8", "replace")
            return r.status_code, excerpt(text)

    def deliver(self, batches: Iterable[Batch]) -> int:
        # Batches are cut at fixed row offsets (batch n = rows n*B .. n*B+B-1 of the chunk), so a
        # rerun sends the same rows under the same Idempotency-Key whatever the read batching.
        head = '{"job_id":' + json.dumps(self.ctx.job_id) + ',"chunk":' + str(self.ctx.chunk) + ',"batch":'
        sent = {"bytes": 0, "rows": 0}
        pending: list[str] = []

        def send() -> None:
            batch_no = sent["rows"] // BATCH_ROWS
            body = f'{head}{batch_no},"rows":[{",".join(pending)}]}}'.encode()
            self._post(batch_no, body)
            sent["bytes"] += len(body)
            sent["rows"] += len(pending)
            pending.clear()

        for batch in batches:
            values, i = batch.values, 0
            while i < len(values):
                take = BATCH_ROWS - len(pending)
                pending.extend(values[i : i + take])
                i += take
                if len(pending) == BATCH_ROWS:
                    send()
        if pending:
            send()
        markers.mark_delivered(self.ctx, sent["rows"], sent["bytes"])
        return sent["bytes"]

    def close(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.close()
