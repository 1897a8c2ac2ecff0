"""The controller's API client (kubeclient.KubeApi) against the real kube-apiserver, under the
chart's RBAC: what each answer means to the controller, a refused token, and the Event lanes."""

from __future__ import annotations

import asyncio
import base64

import kopf
import pytest
import yaml

from beam_operator import metrics
from beam_operator.config import OperatorConfig
from beam_operator.controller import Controller
from beam_operator.kubeclient import ApiError, KubeApi
from beam_operator.runtime.events import Event


def _connection_info(kubeconfig, token: str | None = None) -> kopf.ConnectionInfo:
    doc = yaml.safe_load(open(kubeconfig))
    cluster = doc["clusters"][0]["cluster"]
    return kopf.ConnectionInfo(
        server=cluster["server"],
        ca_data=base64.b64decode(cluster["certificate-authority-data"]),
        token=token or doc["users"][0]["user"]["token"],
    )


def _job(name: str, **template_spec) -> dict:
    spec = template_spec or {"containers": [{"name": "main", "image": "busybox", "command": ["true"]}]}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": {"spec": {"restartPolicy": "Never", **spec}}},
    }


def _backfill(metadata: dict) -> dict:
    return {
        "apiVersion": "beam-backfill.dev/v1alpha1",
        "kind": "BeamBackfill",
        "metadata": metadata,
        "spec": {
            "job_name": "seed",
            "table": "base.assets.erc20_token_transfers",
            "backfill_window": {"partition_key": "block", "start": 0, "end": 4},
            "destinations": [{"type": "kafka", "name": "t"}],
        },
    }


def _run(kubeconfig, scenario, login=None):
    async def main():
        api = KubeApi(
            OperatorConfig(), login=login or (lambda: _connection_info(kubeconfig)), connections=4, timeout=20
        )
        try:
            return await scenario(api)
        finally:
            await api.close()

    return asyncio.run(main())


def test_create_twice_is_found_existing_and_deletes_of_missing_objects_are_quiet(
    k8s, crd_installed, operator_kubeconfig, namespace
):
    async def scenario(api):
        first = await api.create_job(namespace, _job("stage-1"))
        second = await api.create_job(namespace, _job("stage-1"))
        names = await api.live_children(namespace, "no-such-uid")
        await api.delete_job(namespace, "stage-1")
        gone = await api.delete_job(namespace, "never-was")
        return first, second, names, gone

    first, second, names, gone = _run(operator_kubeconfig, scenario)
    assert (first, second) == (True, False)
    assert names == ([], 0) and gone is None
    job = k8s.api("GET", f"/apis/batch/v1/namespaces/{namespace}/jobs/stage-1")
    # Foreground deletion: the Job stays (with a deletionTimestamp) until its Pods are gone.
    assert job["metadata"].get("deletionTimestamp") and "foregroundDeletion" in job["metadata"]["finalizers"]


def test_patch_status_of_a_missing_backfill_is_none_and_of_a_live_one_its_new_body(
    k8s, crd_installed, operator_kubeconfig, namespace
):
    k8s.api(
        "POST",
        f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills",
        {
            "apiVersion": "beam-backfill.dev/v1alpha1",
            "kind": "BeamBackfill",
            "metadata": {"name": "live"},
            "spec": {
                "job_name": "seed",
                "table": "base.assets.erc20_token_transfers",
                "backfill_window": {"partition_key": "block", "start": 0, "end": 4},
                "destinations": [{"type": "kafka", "name": "t"}],
            },
        },
    )

    async def scenario(api):
        missing = await api.patch_status(namespace, "nobody", {"status": "staging"})
        live = await api.patch_status(namespace, "live", {"status": "staging"})
        return missing, live

    missing, live = _run(operator_kubeconfig, scenario)
    assert missing is None
    assert live["status"]["status"] == "staging"
    stored = k8s.api("GET", f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills/live")
    assert stored["status"]["status"] == "staging"


def test_delete_backfill_deletes_only_the_backfill_of_that_uid_and_returns_it_as_the_finalizer_holds_it(
    k8s, crd_installed, operator_kubeconfig, namespace
):
    path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills"
    created = k8s.api("POST", path, _backfill({"name": "expiring", "finalizers": ["beam-backfill.dev/cleanup"]}))
    uid = created["metadata"]["uid"]

    async def scenario(api):
        # An older backfill of the same name (another uid): the precondition refuses, 409.
        other = await api.delete_backfill(namespace, "expiring", "uid-of-an-older-one")
        still = k8s.api("GET", f"{path}/expiring")
        deleting = await api.delete_backfill(namespace, "expiring", uid)
        missing = await api.delete_backfill(namespace, "nobody", uid)
        return other, still, deleting, missing

    other, still, deleting, missing = _run(operator_kubeconfig, scenario)
    assert other is None and not still["metadata"].get("deletionTimestamp")
    assert deleting["metadata"]["uid"] == uid and deleting["metadata"]["deletionTimestamp"]
    assert missing is None
    k8s.api("PATCH", f"{path}/expiring", {"metadata": {"finalizers": None}})


def test_our_finalizer_is_added_only_to_the_version_seen_and_removed_only_where_it_was_seen(
    k8s, crd_installed, operator_kubeconfig, namespace
):
    path = f"/apis/beam-backfill.dev/v1alpha1/namespaces/{namespace}/beambackfills"
    created = k8s.api("POST", path, _backfill({"name": "held"}))
    uid, seen = created["metadata"]["uid"], created["metadata"]["resourceVersion"]
    # Another controller's finalizer arrives after the operator saw the backfill.
    theirs = k8s.api("PATCH", f"{path}/held", {"metadata": {"finalizers": ["example.com/theirs"]}})
    ours = "beam-backfill.dev/cleanup"

    async def scenario(api):
        stale = await api.add_finalizer(namespace, "held", [ours], seen)  # would drop theirs: 409
        added = await api.add_finalizer(
            namespace, "held", ["example.com/theirs", ours], theirs["metadata"]["resourceVersion"]
        )
        k8s.api("DELETE", f"{path}/held")
        # The list as seen before theirs went: ours at index 0 is not what is there now.
        k8s.api("PATCH", f"{path}/held", {"metadata": {"finalizers": [ours]}})
        moved = await api.remove_finalizer(namespace, "held", uid, ["example.com/theirs", ours], ours)
        other_uid = await api.remove_finalizer(namespace, "held", "uid-of-another", [ours], ours)
        kept = k8s.api("GET", f"{path}/held")
        removed = await api.remove_finalizer(namespace, "held", uid, [ours], ours)
        gone = await api.remove_finalizer(namespace, "held", uid, [ours], ours)
        return stale, added, moved, other_uid, kept, removed, gone

    stale, added, moved, other_uid, kept, removed, gone = _run(operator_kubeconfig, scenario)
    assert stale is None
    assert added["metadata"]["finalizers"] == ["example.com/theirs", ours]
    assert moved is False and other_uid is False and kept["metadata"]["finalizers"] == [ours]
    assert removed is True and gone is True
    assert k8s.api("GET", path)["items"] == []


def test_a_bad_request_raises_with_the_request_and_the_apis_message(crd_installed, operator_kubeconfig, namespace):
    async def scenario(api):
        with pytest.raises(ApiError) as e:
            await api.create_job(namespace, _job("bad", containers=[]))
        return e.value

    err = _run(operator_kubeconfig, scenario)
    assert err.status == 422
    assert f"POST /apis/batch/v1/namespaces/{namespace}/jobs" in str(err)
    assert "spec.template.spec.containers: Required value" in str(err)


def test_a_refused_token_logs_in_again_once(operator_kubeconfig, namespace):
    logins = []

    def rotating():
        # The first token is not one the apiserver knows: as after a service-account token rotated.
        logins.append(1)
        return _connection_info(operator_kubeconfig, token="stale" if len(logins) == 1 else None)

    async def scenario(api):
        return await api.live_children(namespace, "x")

    assert _run(operator_kubeconfig, scenario, login=rotating) == ([], 0)
    assert len(logins) == 2

    logins.clear()

    def always_stale():
        logins.append(1)
        return _connection_info(operator_kubeconfig, token="stale")

    with pytest.raises(ApiError, match="HTTP 401"):
        _run(operator_kubeconfig, scenario, login=always_stale)
    assert len(logins) == 2  # once more, not in a loop


def test_events_go_out_through_their_lane_and_a_full_lane_drops(k8s, operator_kubeconfig, namespace):
    body = {"metadata": {"namespace": namespace, "name": "bf", "uid": "uid-bf"}}
    dropped_before = metrics.EVENTS_DROPPED._value.get()

    async def main():
        api = KubeApi(OperatorConfig(), login=lambda: _connection_info(operator_kubeconfig), connections=4, timeout=20)
        ctl = Controller(OperatorConfig(), api, workers=1, event_backlog=1)
        # Not started yet: nothing takes Events off the lane, so the second finds it full.
        ctl.events.record((namespace, "bf"), body, Event("Normal", "Staging", "first"))
        ctl.events.record((namespace, "bf"), body, Event("Normal", "Transporting", "second"))
        ctl.start()
        await asyncio.wait_for(ctl.events.lanes[0].join(), 30)  # posted, not only taken off the queue
        await ctl.stop()

    asyncio.run(main())
    items = k8s.api("GET", f"/api/v1/namespaces/{namespace}/events?fieldSelector=involvedObject.name%3Dbf")["items"]
    assert [(e["reason"], e["message"]) for e in items] == [("Staging", "first")]
    assert metrics.EVENTS_DROPPED._value.get() == dropped_before + 1
