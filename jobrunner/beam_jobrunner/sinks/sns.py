"""Amazon SNS: rows published with PublishBatch, 10 per call, several calls in flight.

FIFO topics (.fifo) get MessageDeduplicationId = sha256(unique_id) (SNS limits ids to 128
characters) and MessageGroupId = <job_id>-<chunk>, which keeps a chunk's rows in order. Each
message carries the attributes beam_job_id and beam_chunk. At-least-once: standard topics have
no deduplication; FIFO topics deduplicate within their 5-minute window.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from beam_jobrunner import reach
from beam_jobrunner.errors import PermanentError, TransientError, excerpt
from beam_jobrunner.sinks import Batch, Sink, markers

log = logging.getLogger("beam_jobrunner.sns")

PER_CALL = 10  # SNS PublishBatch's limit
THREADS = int(os.environ.get("BEAM_SNS_THREADS", "8"))
ATTEMPTS = 5


class SnsSink(Sink):
    def open(self) -> None:
        import boto3
        from botocore.config import Config

        arn = self.dest.topic_arn
        self.fifo = arn.endswith(".fifo")
        region = self.dest.region or arn.split(":")[3]
        creds = {}
        if self.dest.secret:
            creds = {
                "aws_access_key_id": self.require_secret("aws_access_key_id"),
                "aws_secret_access_key": self.require_secret("aws_secret_access_key"),
            }
            token = self.secret("aws_session_token")
            if token:
                creds["aws_session_token"] = token
        else:
            creds = self._ambient_credentials()
        t = self.ctx.connect_timeout
        cfg = Config(
            connect_timeout=t,
            read_timeout=max(t, 30),
            retries={"mode": "standard", "max_attempts": 5},
            max_pool_connections=THREADS * 2,
        )
        self.client = boto3.client("sns", region_name=region, endpoint_url=self.dest.endpoint_url, config=cfg, **creds)
        self.attrs = {
            "beam_job_id": {"DataType": "String", "StringValue": self.ctx.job_id},
            "beam_chunk": {"DataType": "Number", "StringValue": str(self.ctx.chunk)},
        }
        try:
            self.client.get_topic_attributes(TopicArn=arn)
        except Exception as e:
            raise self._error("topic check", e) from None

    def _ambient_credentials(self) -> dict:
        """The worker's own identity (IRSA, an instance role; the operator allows it per
        organization). Its credential endpoints (the metadata service, an STS VPC endpoint) are
        the platform's, not the tenant's: they are resolved outside the destination guard
        (reach.unguarded), once, and frozen for the chunk, since a refresh would run inside the
        guard. botocore hands out credentials with at least 15 minutes left."""
        import boto3
        from botocore.exceptions import NoCredentialsError

        try:
            with reach.unguarded():
                found = boto3.Session().get_credentials()
                if found is None:
                    raise NoCredentialsError()
                frozen = found.get_frozen_credentials()
        except Exception as e:
            raise self._error("credentials", e) from None
        creds = {"aws_access_key_id": frozen.access_key, "aws_secret_access_key": frozen.secret_key}
        if frozen.token:
            creds["aws_session_token"] = frozen.token
        return creds

    def _error(self, what: str, e: Exception) -> Exception:
        from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

        if isinstance(e, NoCredentialsError):
            return PermanentError(
                f"{self.label}: {what}: no AWS credentials (set the destination's secret or the worker's identity)"
            )
        if isinstance(e, ClientError):
            code = e.response.get("Error", {}).get("Code", "")
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            msg = excerpt(e.response.get("Error", {}).get("Message", ""))
            if 400 <= status < 500 and code not in ("Throttling", "ThrottlingException", "ThrottledException"):
                return PermanentError(f"{self.label}: {what}: {excerpt(code)}: {msg}")
            return TransientError(f"{self.label}: {what}: {excerpt(code)}: {msg}")
        if isinstance(e, EndpointConnectionError):
            return TransientError(f"{self.label}: {what}: endpoint unreachable after {self.ctx.connect_timeout:.0f}s")
        return TransientError(f"{self.label}: {what}: {type(e).__name__}: {excerpt(str(e))}")

    def already_delivered(self) -> bool:
        return markers.is_delivered(self.ctx)

    def _entries(self, values: list[str], keys: list) -> list[dict]:
        group = f"{self.ctx.job_id}-{self.ctx.chunk}"
        out = []
        for i, (v, k) in enumerate(zip(values, keys, strict=True)):
            e = {"Id": str(i), "Message": v, "MessageAttributes": self.attrs}
            if self.fifo:
                e["MessageGroupId"] = group
                e["MessageDeduplicationId"] = hashlib.sha256((k if k is not None else v).encode()).hexdigest()
            out.append(e)
        return out

    def _publish(self, entries: list[dict]) -> None:
        todo = entries
        for attempt in range(1, ATTEMPTS + 1):
            try:
                r = self.client.publish_batch(TopicArn=self.dest.topic_arn, PublishBatchRequestEntries=todo)
            except Exception as e:
                err = self._error("publish", e)
                if isinstance(err, PermanentError) or attempt == ATTEMPTS:
                    raise err from None
                time.sleep(0.5 * attempt)
                continue
            failed = r.get("Failed", [])
            if not failed:
                return
            sender = [f for f in failed if f.get("SenderFault")]
            if sender:
                f = sender[0]
                raise PermanentError(
                    f"{self.label}: SNS refused a message: {excerpt(f.get('Code'))}: {excerpt(f.get('Message'))}"
                )
            if attempt == ATTEMPTS:
                f = failed[0]
                raise TransientError(
                    f"{self.label}: {len(failed)} messages failed after {ATTEMPTS} attempts: {excerpt(f.get('Code'))}"
                )
            ids = {f["Id"] for f in failed}
            todo = [e for e in todo if e["Id"] in ids]
            time.sleep(0.5 * attempt)

    def deliver(self, batches: Iterable[Batch]) -> int:
        nbytes = rows = 0
        with ThreadPoolExecutor(THREADS) as pool:
            for batch in batches:
                entries = self._entries(batch.values, batch.keys)
                calls = [entries[i : i + PER_CALL] for i in range(0, len(entries), PER_CALL)]
                for _ in pool.map(self._publish, calls):
                    pass
                rows += len(batch.values)
                nbytes += batch.nbytes
        markers.mark_delivered(self.ctx, rows, nbytes)
        return nbytes
