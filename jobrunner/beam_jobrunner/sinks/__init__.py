"""Destinations: one class per type, all driven by transport.deliver_chunk().

A sink gets the chunk's rows as encoded batches (JSON text and keys, see serialize.py) and must
either deliver all of them or raise a JobError. Whether a chunk was already delivered is the
sink's business: Kafka keeps that fact inside its own transaction (kafka.py); the others
record it in GCS after the last acknowledgement (markers.py), which makes them at-least-once.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from beam_contract.addresses import endpoint, norm_host
from beam_contract.worker import Env, destination_env
from beam_jobrunner import log_tail
from beam_jobrunner.errors import PermanentError

# The keys whose values authenticate: too short a value is refused rather than left unmasked.
CREDENTIALS = frozenset(
    {"sasl_password", "hash_key", "password", "token", "aws_secret_access_key", "aws_session_token"}
)


@dataclass
class Batch:
    values: list  # str, or _rows.Message (read-only bytes-like) for sinks that take bytes
    keys: list  # str | None, or bytes | None
    first_row: int  # offset of values[0] within the chunk
    nbytes: int  # UTF-8 size of the values


@dataclass
class Context:
    job_id: str
    chunk: int
    dest_index: int
    staging_uri: str
    connect_timeout: float
    namespace: str = "default"  # the organization: its managed-Kafka topics are <namespace>.<name>


class Sink:
    kind = "destination"

    def __init__(self, dest, ctx: Context) -> None:
        self.dest = dest
        self.ctx = ctx

    @property
    def label(self) -> str:
        return f"{self.dest.type} destination {self.dest.name!r} chunk {self.ctx.chunk}"

    def secret(self, key: str) -> str | None:
        value = os.environ.get(destination_env(self.ctx.dest_index, key))
        if value and key in CREDENTIALS and len(value.strip()) < log_tail.MIN_SECRET:
            raise PermanentError(
                f"{self.label}: secret key {key} is shorter than {log_tail.MIN_SECRET} characters: too short "
                "to be a credential, or to be masked in logs; put a longer one in the destination's Secret"
            )
        return value or None

    def check_secret_bound(self, host: str, port: int | None, what: str = "server") -> None:
        """Refuse to send this destination's credentials to `host`:`port` unless its Secret names
        that endpoint in its key `endpoints` (host:port or *.suffix:port, comma-separated). A
        Secret that names none is refused too, unless the operator's secret_endpoints_required
        is false. The names are compared as written (case and a final dot aside): another
        spelling of an allowed server is refused, never the other way round."""
        if not getattr(self.dest, "secret", None):
            return
        bound = self.secret("endpoints")
        if not bound:
            if os.environ.get(Env.SECRET_ENDPOINTS_REQUIRED, "true").lower() in ("false", "0", "no"):
                return
            raise PermanentError(
                f"{self.label}: Secret {self.dest.secret!r} does not say which endpoints its credentials are for; "
                "whoever provisions it adds the key endpoints (host:port, comma-separated) "
                '(docs/security.md, "A Secret is bound to its endpoints")'
            )
        if not endpoint_bound(bound, host, port):
            raise PermanentError(
                f"{self.label}: Secret {self.dest.secret!r} is for {bound}, not {what} {host}:{port}: "
                "its credentials are not sent there"
            )

    def require_secret(self, key: str) -> str:
        value = self.secret(key)
        if value is None:
            raise PermanentError(
                f"{self.label}: secret key {key} missing (env {destination_env(self.ctx.dest_index, key)}; "
                f"is it in the Secret the destination names?)"
            )
        return value

    def open(self) -> None:
        """Connect, or fail within ctx.connect_timeout naming what is wrong."""

    def already_delivered(self) -> bool:
        raise NotImplementedError

    def deliver(self, batches: Iterable[Batch]) -> int:
        """Deliver every row; return the number of bytes sent."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def redact_url(url: str) -> str:
    """scheme://host[:port]/path: no userinfo, query or fragment, which may carry tokens."""
    try:
        u = urlsplit(url)
        host = u.hostname or ""
        port = f":{u.port}" if u.port else ""
        return f"{u.scheme}://{host}{port}{u.path}"
    except ValueError:
        return re.sub(r"//[^@/]*@", "//", url.split("?")[0])


def make_sink(dest, ctx: Context) -> Sink:
    if dest.type == "kafka":
        from beam_jobrunner.sinks.kafka import KafkaSink as cls
    elif dest.type == "webhook":
        from beam_jobrunner.sinks.webhook import WebhookSink as cls
    elif dest.type == "nats":
        from beam_jobrunner.sinks.nats import NatsSink as cls
    elif dest.type == "sns":
        from beam_jobrunner.sinks.sns import SnsSink as cls
    else:  # the model's discriminator makes this unreachable
        raise PermanentError(f"unknown destination type {dest.type!r}")
    return cls(dest, ctx)


def endpoint_bound(bound: str, host: str, port: int | None) -> bool:
    """Whether host:port is one of `bound`'s entries (host:port, or *.suffix:port)."""
    host = norm_host(host)
    for entry in filter(None, (e.strip() for e in bound.split(","))):
        found = endpoint(entry)
        if found is None:
            continue
        want_host, want_port = found
        if want_port is not None and want_port != port:
            continue
        if want_host == host or (want_host.startswith("*.") and host.endswith(want_host[1:])):
            return True
    return False
