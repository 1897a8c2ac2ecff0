"""beam_contract.logs: one JSON object per line, the backfill's fields on the lines about one."""

from __future__ import annotations

import io
import json
import logging

import pytest

from beam_contract import logs


@pytest.fixture
def captured():
    """What the root handler writes (pytest's own capture swaps sys.stderr between phases, so
    the handler's stream is redirected after configure() instead)."""
    out = io.StringIO()
    yield out
    logging.getLogger().handlers.clear()


def _configure(out, fmt, **kw):
    logs.configure("INFO", fmt=fmt, **kw)
    logging.getLogger().handlers[0].setStream(out)


def test_lines_are_json_with_the_backfill_of_the_context_and_the_fixed_fields(captured):
    _configure(captured, "json", fixed={"phase": "transport", "chunk": "3"})
    with logs.backfill_context(namespace="org-a", name="usdc", job_id="u-1"):
        logging.getLogger("beam").info("delivered %d rows", 6000)
    logging.getLogger("beam").warning("no backfill")
    first, second = (json.loads(line) for line in captured.getvalue().splitlines())
    assert first["message"] == "delivered 6000 rows" and first["level"] == "INFO" and first["logger"] == "beam"
    assert {k: first[k] for k in ("namespace", "name", "job_id", "phase", "chunk")} == {
        "namespace": "org-a",
        "name": "usdc",
        "job_id": "u-1",
        "phase": "transport",
        "chunk": "3",
    }
    assert "namespace" not in second and second["phase"] == "transport"


def test_kopfs_object_loggers_are_json_too_and_name_their_backfill(captured):
    import kopf
    from kopf._core.actions.loggers import ObjectLogger

    _configure(captured, "json")
    # Another test's logging.config.dictConfig (disable_existing_loggers) may have disabled it.
    logging.getLogger("kopf.objects").disabled = False
    body = kopf.Body({"kind": "BeamBackfill", "metadata": {"name": "usdc", "namespace": "org-a", "uid": "u-1"}})
    try:
        raise kopf.TemporaryError("waiting for the backfill's Jobs to be deleted")
    except kopf.TemporaryError:
        ObjectLogger(body=body, settings=kopf.OperatorSettings()).exception("handler failed")
    [record] = [json.loads(line) for line in captured.getvalue().splitlines()]
    assert record["message"] == "handler failed" and "TemporaryError" in record["exc_info"]
    assert (record["namespace"], record["name"], record["job_id"]) == ("org-a", "usdc", "u-1")
    assert "settings" not in record


def test_text_for_a_terminal_and_a_clear_error_for_a_bad_format(captured, monkeypatch):
    _configure(captured, "text")
    logging.getLogger("beam").info("hello")
    assert captured.getvalue().strip().endswith("INFO beam: hello")
    monkeypatch.setenv(logs.FORMAT_ENV, "yaml")
    with pytest.raises(ValueError, match="BEAM_LOG_FORMAT='yaml': use json, text or auto"):
        logs.wants_json()
