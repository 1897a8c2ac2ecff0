"""The Argo CD health check, run as Argo CD would: Lua, with `obj` as the BeamBackfill."""

from __future__ import annotations

import importlib
from typing import Any

import pytest
import yaml
from chartlib import CHART, REPO

LUA = (CHART / "argocd" / "health.lua").read_text()


def _to_lua(lua, value: Any):
    # Argo CD turns the object's JSON into Lua tables; a JSON null becomes an absent key.
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items() if v is not None})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


# Argo CD uses gopher-lua (5.1 rules, every number a float); 5.4 (integers and floats) guards
# against relying on either.
@pytest.fixture(params=["lua51", "lua54"])
def health(request):
    lupa = importlib.import_module(f"lupa.{request.param}")

    def run(obj: dict[str, Any]) -> dict[str, str]:
        lua = lupa.LuaRuntime(unpack_returned_tuples=True)
        lua.globals().obj = _to_lua(lua, obj)
        hs = lua.execute(LUA)
        return dict(hs.items())

    return run


def backfill(status: dict[str, Any] | None = None, *, cancel: bool = False, floats: bool = False) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": "usdc", "namespace": "acme"},
        "spec": {
            "job_name": "usdc",
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {"partition_key": "block", "start": 1, "end": 100},
            "destinations": [{"type": "kafka", "name": "usdc"}],
            "cancel": cancel,
        },
    }
    if status is not None:
        if floats:
            status = {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v for k, v in status.items()}
        obj["status"] = status
    return obj


def test_missing_status_block_is_progressing(health):
    assert health(backfill()) == {
        "status": "Progressing",
        "message": "Waiting for the operator to pick up the backfill",
    }


def test_empty_status_is_progressing(health):
    assert health(backfill({"status": ""}))["status"] == "Progressing"
    assert health(backfill({}))["status"] == "Progressing"


def test_staging_is_progressing(health):
    hs = health(backfill({"status": "staging", "job_id": "u1", "num_chunks": None}))
    assert hs["status"] == "Progressing"
    assert hs["message"].startswith("Staging")


@pytest.mark.parametrize("floats", [False, True], ids=["ints", "floats"])
def test_transporting_reports_chunks_left(health, floats):
    hs = health(
        backfill({"status": "transporting", "num_chunks": 12, "chunks_left": 5, "num_rows": 1000}, floats=floats)
    )
    assert hs == {"status": "Progressing", "message": "Transporting: 5 of 12 chunks left"}


def test_transporting_before_counts_arrive(health):
    assert health(backfill({"status": "transporting"})) == {"status": "Progressing", "message": "Transporting"}


@pytest.mark.parametrize("floats", [False, True], ids=["ints", "floats"])
def test_completed_is_healthy(health, floats):
    hs = health(
        backfill(
            {
                "status": "completed",
                "num_chunks": 12,
                "chunks_left": 0,
                "num_rows": 123456789,
                "time_completed": "2026-01-01T00:00:00Z",
            },
            floats=floats,
        )
    )
    assert hs == {"status": "Healthy", "message": "Completed: 123456789 rows in 12 chunks delivered"}


def test_failed_is_degraded_with_the_error_message(health):
    error = "kafka destination 'usdc' chunk 7: broker 10.0.0.1:9092 unreachable after 30s"
    assert health(backfill({"status": "failed", "error_message": error})) == {"status": "Degraded", "message": error}


def test_failed_without_message_still_says_why_to_look(health):
    for status in (
        {"status": "failed"},
        {"status": "failed", "error_message": None},
        {"status": "failed", "error_message": ""},
    ):
        hs = health(backfill(status))
        assert hs["status"] == "Degraded" and "failed" in hs["message"]


def test_cancelled_is_suspended(health):
    assert health(backfill({"status": "cancelled"}, cancel=True)) == {
        "status": "Suspended",
        "message": "Cancelled by spec.cancel",
    }


def test_cancel_requested_but_not_yet_done(health):
    hs = health(backfill({"status": "transporting", "num_chunks": 4, "chunks_left": 4}, cancel=True))
    assert hs["status"] == "Progressing" and hs["message"].startswith("Cancelling")
    # A late cancel on a finished backfill does not make it look busy again.
    assert health(backfill({"status": "completed"}, cancel=True))["status"] == "Healthy"


def test_a_suspended_backfill_is_suspended_and_a_resumed_one_progressing(health):
    cond = {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "suspended by request"}
    hs = health(backfill({"status": "transporting", "num_chunks": 4, "chunks_left": 2, "conditions": [cond]}))
    assert (
        hs["status"] == "Suspended" and hs["message"] == "Suspended by spec.suspend (Transporting: 2 of 4 chunks left)"
    )
    resumed = {**cond, "status": "False", "reason": "Resumed"}
    hs = health(backfill({"status": "transporting", "num_chunks": 4, "chunks_left": 2, "conditions": [resumed]}))
    assert hs["status"] == "Progressing"
    # A finished backfill is what it ended as, whatever its last Suspended condition said.
    assert (
        health(backfill({"status": "completed", "num_chunks": 4, "num_rows": 9, "conditions": [cond]}))["status"]
        == "Healthy"
    )


def test_unknown_status_is_unknown(health):
    assert health(backfill({"status": "paused"})) == {"status": "Unknown", "message": "Unknown backfill status: paused"}


def test_argocd_cm_snippet_carries_the_same_script():
    cm = yaml.safe_load((REPO / "docs" / "argocd-cm.yaml").read_text())
    assert cm["kind"] == "ConfigMap" and cm["metadata"] == {
        "name": "argocd-cm",
        "namespace": "argocd",
        "labels": {"app.kubernetes.io/name": "argocd-cm", "app.kubernetes.io/part-of": "argocd"},
    }
    assert cm["data"] == {"resource.customizations.health.beam-backfill.dev_BeamBackfill": LUA}


def test_every_status_of_the_model_is_covered():
    from beam_contract.model import Phase

    for status in Phase:
        assert f'phase == "{status}"' in LUA, status
