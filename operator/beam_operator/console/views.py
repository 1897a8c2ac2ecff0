"""What the console shows of a BeamBackfill: its public job view plus progress, rates and times.

All of it is computed from the resource as read (status fields of docs/operations.md), never
stored elsewhere, so the console, the REST API and `kubectl get bbf -o wide` cannot disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import yaml

from beam_contract.model import GROUP, KIND, TERMINAL, VERSION, parse_timestamp
from beam_operator.api.public_job import job_view, public_status

# Annotations and labels of our own making, left out of the manifest a user copies for Argo CD.
_INTERNAL_PREFIXES = (f"{GROUP}/", "kubectl.kubernetes.io/", "kopf.zalando.org/", "app.kubernetes.io/created-by")


def _at(value: str | None) -> datetime | None:
    return parse_timestamp(value) if value else None


def progress_view(obj: dict[str, Any], now: datetime | None = None) -> dict[str, Any]:
    """The list's row: the public job, and what a person watches while it runs."""
    now = now or datetime.now(UTC)
    view = job_view(obj)
    st = obj.get("status") or {}
    created = _at(view["time_created"])
    completed = _at(st.get("time_completed"))
    moving = _at(st.get("time_transporting_started"))
    end = completed or now
    rows_staged, rows_delivered = st.get("num_rows"), st.get("rows_delivered")
    rate = None
    if moving and rows_delivered:
        rate = rows_delivered / max((end - moving).total_seconds(), 1.0)
    left = None
    if view["status"] == "transporting" and rate and rows_staged is not None and rows_delivered is not None:
        left = max(rows_staged - rows_delivered, 0) / rate
    conditions = {c.get("type"): c for c in st.get("conditions") or []}
    suspended = (conditions.get("Suspended") or {}).get("status") == "True"
    num, chunks_left = view["num_chunks"], view["chunks_left"]
    return {
        "job_id": view["job_id"],
        "name": obj["metadata"]["name"],
        "job_name": view["job_name"],
        "table": view["table"],
        "status": view["status"],
        "suspended": suspended,
        "cancel_requested": bool((obj.get("spec") or {}).get("cancel")) and view["status"] not in TERMINAL,
        "num_chunks": num,
        "chunks_done": (num - chunks_left) if num is not None and chunks_left is not None else None,
        "rows_staged": rows_staged,
        "rows_delivered": rows_delivered,
        "rows_per_second": round(rate) if rate else None,
        "elapsed_seconds": round((end - created).total_seconds(), 1) if created else None,
        "seconds_left": round(left, 1) if left is not None else None,
        "error_message": view["error_message"],
        "time_created": view["time_created"],
        "time_completed": view["time_completed"],
        "attempt": st.get("attempt"),
    }


def ended(obj: dict[str, Any]) -> bool:
    return public_status(obj) in TERMINAL


def manifest_yaml(obj: dict[str, Any]) -> str:
    """The backfill as a manifest to keep in Git (Argo CD): what `kubectl get -o yaml` shows,
    less what the cluster adds (status, uid, resourceVersion, managedFields, our annotations)."""
    meta = obj["metadata"]
    out_meta: dict[str, Any] = {"name": meta["name"], "namespace": meta["namespace"]}
    for part in ("labels", "annotations"):
        kept = {k: v for k, v in (meta.get(part) or {}).items() if not k.startswith(_INTERNAL_PREFIXES)}
        if kept:
            out_meta[part] = kept
    doc = {"apiVersion": f"{GROUP}/{VERSION}", "kind": KIND, "metadata": out_meta, "spec": obj.get("spec") or {}}
    return yaml.safe_dump(doc, sort_keys=False, width=100)


def actions(obj: dict[str, Any]) -> list[str]:
    """What the resource lets a user do now: cancel and suspend while it runs, resume while
    suspended, retry once it failed (spec.retry; a cancelled backfill stays cancelled)."""
    status = public_status(obj)
    spec = obj.get("spec") or {}
    if status == "failed":
        return ["retry"]
    if status in TERMINAL or spec.get("cancel"):
        return []
    return ["cancel", "resume" if spec.get("suspend") else "suspend"]
