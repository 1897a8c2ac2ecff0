"""A failed worker's last log lines, kept for its termination message, with secret values masked.

The Jobs' TTL deletes finished Pods and their logs; the termination message is what the operator
reads once the Job has failed (and copies into an Event), so a user can still see what the
worker did last. Secrets reach a worker only as env variables (docs/worker-contract.md): their
values are masked in every line here and in the error itself, whatever wrote them there (a
remote answer echoing a key, say).
"""

from __future__ import annotations

import logging
import os
from collections import deque

from beam_contract.worker import LOG_TAIL_MARK, TERMINATION_MESSAGE_MAX_BYTES, snowflake_env

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
            self.lines.append(self.format(record).splitlines()[0][:LINE_MAX])
        except Exception:  # a log line must never fail the worker
            pass


_tail = _Tail()


def install() -> None:
    logging.getLogger().addHandler(_tail)


def _secret_values() -> list[str]:
    names = [n for n in os.environ if n.startswith("BEAM_DEST_")] + [snowflake_env("password")]
    # Longest first: a secret that contains another is masked whole.
    return sorted({v for n in names if len(v := os.environ.get(n) or "") >= 4}, key=len, reverse=True)


def mask(text: str) -> str:
    for value in _secret_values():
        text = text.replace(value, MASK)
    return text


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
