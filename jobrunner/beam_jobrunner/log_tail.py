"""A failed worker's last log lines, kept for its termination message, with secret values masked.

The Jobs' TTL deletes finished Pods and their logs; the termination message is what the operator
reads once the Job has failed (and copies into an Event), so a user can still see what the
worker did last. Secrets reach a worker only as env variables (docs/worker-contract.md): their
values are masked in every line here and in the error itself, whatever wrote them there (a
remote answer echoing a key, say).
"""

from __future__ import annotations

import base64
import json
import logging
import os
from collections import deque
from functools import lru_cache
from urllib.parse import quote, quote_plus

from beam_contract.worker import LOG_TAIL_MARK, TERMINATION_MESSAGE_MAX_BYTES, Env, snowflake_env

LINES = 20
LINE_MAX = 300
MASK = "***"
_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Tail(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: deque[str] = deque(maxlen=LINES)
        self.setFormatter(logging.Formatter(_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.lines.append(cut(self.format(record).splitlines()[0], LINE_MAX))
        except Exception:  # a log line must never fail the worker
            pass


_tail = _Tail()


def install() -> None:
    root = logging.getLogger()
    for handler in [*root.handlers, _tail]:
        handler.addFilter(_Masking())
    root.addHandler(_tail)


MIN_SECRET = 4  # shorter values cannot be masked without masking ordinary text: refused (sinks)
_B64_CORE = 8  # a base64 form is masked from this many stable characters on


def _encodings(value: str) -> set[str]:
    """Every form `value` may take in a text: as written, without the newline that
    `kubectl create secret --from-file` adds, whitespace collapsed (as errors.excerpt does),
    URL-, JSON-, hex- and base64-encoded. Base64 of a value inside a longer string depends on
    the value's offset modulo 3: each of the three alignments' stable characters is a form."""
    forms = set()
    for v in {value, value.strip(), " ".join(value.split())}:
        raw = v.encode()
        forms |= {v, quote(v, safe=""), quote_plus(v), json.dumps(v)[1:-1], raw.hex(), raw.hex().upper()}
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            for k in range(3):
                enc = encode(b"\0" * k + raw).decode().rstrip("=")
                end = len(enc) - (1 if (k + len(raw)) % 3 else 0)  # the last character mixes in what follows
                core = enc[(8 * k + 5) // 6 : end]
                if len(core) >= _B64_CORE:
                    forms.add(core)
    return {f for f in forms if len(f) >= MIN_SECRET}


@lru_cache(maxsize=8)
def _forms_of(values: tuple[str, ...]) -> tuple[str, ...]:
    # Longest first: a secret that contains another is masked whole.
    return tuple(sorted({f for v in values for f in _encodings(v)}, key=len, reverse=True))


def _secret_values() -> tuple[str, ...]:
    # A Secret's `endpoints` is where its credentials may go, not a credential: quoted in errors.
    names = [n for n in os.environ if n.startswith("BEAM_DEST_") and not n.endswith("_ENDPOINTS")]
    names += [snowflake_env("password"), Env.STAGING_KEY]
    return _forms_of(tuple(sorted({v for n in names if len((v := os.environ.get(n) or "").strip()) >= MIN_SECRET})))


def mask(text: str) -> str:
    for form in _secret_values():
        if form in text:
            text = text.replace(form, MASK)
    return text


def cut(text: str, limit: int) -> str:
    """`text` masked, then at most `limit` characters, with no start of a secret left at the
    cut (a value cut in half is masked before it is cut, and any start of one at the end is
    masked after)."""
    text = mask(text)
    if len(text) <= limit:
        return text
    text = text[:limit]
    for form in _secret_values():
        for n in range(min(len(form) - 1, len(text)), MIN_SECRET - 1, -1):
            if text.endswith(form[:n]):
                return text[:-n] + MASK
    return text


class _Masking(logging.Filter):
    """Every log record's message and traceback masked before any handler formats it: what a
    worker logs on each retry (a receiver's 5xx answer, say) reaches the Pod's log masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
            masked = mask(message)
            if masked != message:
                record.msg, record.args = masked, None
            if record.exc_info and not record.exc_text:
                record.exc_text = mask(logging.Formatter().formatException(record.exc_info))
        except Exception:  # a log line must never fail the worker
            pass
        return True


def termination_message(error: str) -> str:
    """`error`, then the log's last lines, masked, within what the kubelet keeps."""
    head = mask(error)
    lines = [mask(line) for line in _tail.lines]
    budget = TERMINATION_MESSAGE_MAX_BYTES - len(head.encode()) - len(LOG_TAIL_MARK) - 2
    kept: list[str] = []
    for line in reversed(lines):  # the newest lines matter most
        size = len(line.encode()) + 1
        if size > budget:
            break
        kept.insert(0, line)
        budget -= size
    return "\n".join([head, LOG_TAIL_MARK, *kept]) if kept else head
