"""Polling helpers for the operator tests (a module of its own: every test dir has a conftest)."""

from beam_devstack.substrate.proc import wait_for

__all__ = ["get_bbf", "wait_for", "wait_status"]


def get_bbf(k8s, ns, name):
    return k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{ns}/beambackfills/{name}")


def wait_status(k8s, ns, name, statuses, timeout=60.0):
    statuses = {statuses} if isinstance(statuses, str) else set(statuses)
    seen = []

    def check():
        st = get_bbf(k8s, ns, name).get("status") or {}
        if not seen or seen[-1] != st.get("status"):
            seen.append(st.get("status"))
        return st if st.get("status") in statuses else None

    try:
        return wait_for(check, timeout, f"{ns}/{name} to be {statuses}")
    except AssertionError as e:
        raise AssertionError(f"{e}; statuses seen: {seen}") from None


def jobs_of(k8s, ns, uid, kind=None):
    sel = f"beam-backfill.dev/job-id={uid}" + (f",beam-backfill.dev/phase={kind}" if kind else "")
    import urllib.parse

    return k8s.api("GET", f"/apis/batch/v1/namespaces/{ns}/jobs?labelSelector={urllib.parse.quote(sel)}")["items"]


def backfill_body(name: str, **spec) -> dict:
    """A small BeamBackfill by block height; `spec` adds or replaces fields."""
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": {"name": name},
        "spec": {
            "job_name": name,
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {"partition_key": "block", "start": 0, "end": 10},
            "destinations": [{"type": "kafka", "name": "t"}],
            **spec,
        },
    }
