"""How the operator, the REST API and the workers log: one JSON object per line, or plain text for
a terminal, and on every line that concerns a backfill its namespace, name, job_id and phase.

BEAM_LOG_FORMAT: json, text, or auto (the default: text when stderr is a terminal, json
otherwise, so a Pod's log is JSON and a developer's shell is not). The backfill's fields come
from a context variable (`backfill_context`, set around the operator's work on one backfill)
or, in a worker, from the fields it was started with; no secret is ever one of them.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

FIELDS = ("namespace", "name", "job_id", "phase")
# A LogRecord's `name` is its logger's: the backfill's name travels as backfill_name and is
# written as "name" (the logger's as "logger").
_ATTR = {"name": "backfill_name"}
FORMAT_ENV = "BEAM_LOG_FORMAT"
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_context: ContextVar[dict[str, Any] | None] = ContextVar("beam_backfill_log_context", default=None)


@contextmanager
def backfill_context(**fields: Any) -> Iterator[None]:
    """Every log line inside carries these fields (asyncio tasks copy the context they start in)."""
    token = _context.set({**(_context.get() or {}), **{k: v for k, v in fields.items() if v not in (None, "")}})
    try:
        yield
    finally:
        _context.reset(token)


class _BackfillFields(logging.Filter):
    def __init__(self, fixed: dict[str, Any]) -> None:
        super().__init__()
        self.fixed = {k: v for k, v in fixed.items() if v not in (None, "")}

    def filter(self, record: logging.LogRecord) -> bool:
        ref = getattr(record, "k8s_ref", None)  # kopf's per-object loggers name their object so
        if isinstance(ref, dict) and ref.get("kind") == "BeamBackfill":
            for k, v in (("namespace", ref.get("namespace")), ("name", ref.get("name")), ("job_id", ref.get("uid"))):
                if v and not hasattr(record, _ATTR.get(k, k)):
                    setattr(record, _ATTR.get(k, k), v)
        for k, v in {**self.fixed, **(_context.get() or {})}.items():
            attr = _ATTR.get(k, k)
            if not hasattr(record, attr):
                setattr(record, attr, v)
        return True


def wants_json(fmt: str | None = None) -> bool:
    fmt = (fmt or os.environ.get(FORMAT_ENV) or "auto").lower()
    if fmt not in ("json", "text", "auto"):
        raise ValueError(f"{FORMAT_ENV}={fmt!r}: use json, text or auto")
    return fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())


def configure(level: str | int = "INFO", *, fmt: str | None = None, fixed: dict[str, Any] | None = None) -> None:
    """The root logger writes to stderr, as JSON or text, with the backfill's fields added."""
    handler = logging.StreamHandler(sys.stderr)
    if wants_json(fmt):
        from pythonjsonlogger.core import RESERVED_ATTRS
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                TEXT.replace(":", ""),
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger", "backfill_name": "name"},
                # kopf's object loggers carry its whole settings object and a reference the
                # filter has already turned into the fields above.
                reserved_attrs=[*RESERVED_ATTRS, "settings", "k8s_skip", "k8s_ref"],
                json_default=str,  # anything else a library attaches: its text, not a logging error
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT))
    handler.addFilter(_BackfillFields(fixed or {}))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    logging.captureWarnings(True)  # warnings too, as lines of the same format
