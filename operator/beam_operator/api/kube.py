"""The BeamBackfill resources, as the REST API reads and writes them (sync client, called from
FastAPI's thread pool)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
from kubernetes import client, config
from kubernetes.client import ApiClient, ApiException

from beam_contract.model import GROUP, KIND, PLURAL, VERSION
from beam_operator.api.public_job import CREATED_AT_ANNOTATION


def api_client(kubeconfig: str | None = None) -> ApiClient:
    """From a kubeconfig (argument, $KUBECONFIG or ~/.kube/config), else the Pod's in-cluster
    ServiceAccount (whose rotating token the client re-reads)."""
    path = kubeconfig or os.environ.get("KUBECONFIG") or os.path.expanduser("~/.kube/config")
    cfg = client.Configuration()
    if os.path.exists(path):
        config.load_kube_config(config_file=path, client_configuration=cfg)
    else:
        config.load_incluster_config(client_configuration=cfg)
    # One connection per worker thread instead of urllib3's default pool of a few, which would
    # make concurrent requests queue for a connection and log pool-full warnings.
    cfg.connection_pool_maxsize = 32
    return ApiClient(cfg)


PAGE_SIZE = 100  # backfills per list request: at most 100 specs of 1 MB in memory at once


class Backfills:
    def __init__(self, api: ApiClient, page_size: int = PAGE_SIZE) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.page_size = page_size

    def create(self, namespace: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {
                "generateName": "bf-",
                "annotations": {CREATED_AT_ANNOTATION: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")},
                "labels": {"app.kubernetes.io/created-by": "beam-api"},
            },
            "spec": spec,
        }
        for attempt in range(3):
            try:
                return self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
            except ApiException as e:
                # generateName collided with an existing name: the apiserver asks us to retry.
                if e.status == 409 and attempt < 2 and "AlreadyExists" in (e.body or ""):
                    continue
                raise
        raise AssertionError("unreachable")

    def pages(self, namespace: str) -> Iterator[list[dict[str, Any]]]:
        """The namespace's backfills a page at a time (limit + continue): a caller that keeps
        only what it answers holds one page of whole objects at most, whatever the namespace
        holds (issue 25: a whole namespace of 1 MB filters read at once OOMed the API)."""
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"limit": self.page_size, "_preload_content": False}
            if token:
                kwargs["_continue"] = token
            # The raw body parsed with orjson: the generated client's own decoding of a large
            # page costs more than the request itself.
            resp = self.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, **kwargs)
            try:
                doc = orjson.loads(resp.data)
            finally:
                resp.release_conn()
            yield doc["items"]
            token = (doc.get("metadata") or {}).get("continue")
            if not token:
                return

    def list(self, namespace: str) -> list[dict[str, Any]]:
        return [obj for page in self.pages(namespace) for obj in page]

    def find(self, namespace: str, uid: str) -> dict[str, Any] | None:
        # The uid is not a field selector of custom resources: page through the namespace.
        for page in self.pages(namespace):
            for obj in page:
                if obj["metadata"]["uid"] == uid:
                    return obj
        return None

    def patch_spec(self, namespace: str, name: str, resource_version: str, spec: dict[str, Any]) -> dict[str, Any]:
        """Change the mutable spec fields (suspend, retry) of the backfill as it was seen: 409 if
        it changed since."""
        patch = {"metadata": {"resourceVersion": resource_version}, "spec": spec}
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _content_type="application/merge-patch+json"
        )

    def request_cancel(self, namespace: str, name: str, resource_version: str) -> dict[str, Any]:
        # resourceVersion as a precondition: if the job changed since we judged it cancellable,
        # the apiserver answers 409 and the caller looks again.
        patch = {"metadata": {"resourceVersion": resource_version}, "spec": {"cancel": True}}
        return self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name, patch, _content_type="application/merge-patch+json"
        )


def status_message(e: ApiException) -> tuple[str, list[dict[str, Any]]]:
    """The apiserver's Status message and its causes, for passing a refusal on to the caller."""
    try:
        body = orjson.loads(e.body or b"{}")
    except orjson.JSONDecodeError:
        return (e.body or e.reason or "").strip(), []
    return body.get("message") or e.reason or "", (body.get("details") or {}).get("causes") or []


def events_of(core: client.CoreV1Api, namespace: str, uid: str, limit: int = 100) -> list[dict[str, Any]]:
    """The Events about one backfill, oldest first: the operator's transitions and the failed
    workers' last log lines (masked by the workers before they wrote them)."""
    resp = core.list_namespaced_event(
        namespace, field_selector=f"involvedObject.uid={uid}", limit=limit, _preload_content=False
    )
    try:
        items = orjson.loads(resp.data)["items"]
    finally:
        resp.release_conn()
    return sorted(items, key=lambda e: e.get("lastTimestamp") or e.get("eventTime") or "")


class Previews:
    """BeamPreviews, as the API uses them: create one, wait for the operator's answer, delete it."""

    def __init__(self, api: ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api)

    def run(self, namespace: str, spec: dict[str, Any], timeout: float) -> dict[str, Any]:
        """The BeamPreview's status once it succeeded or failed, or TimeoutError. The preview is
        deleted either way (its Job with it); the operator deletes any left behind."""
        import time

        from beam_contract.preview import PREVIEW_KIND, PREVIEW_PLURAL

        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": PREVIEW_KIND,
            "metadata": {"generateName": "preview-", "labels": {"app.kubernetes.io/created-by": "beam-api"}},
            "spec": spec,
        }
        obj = self.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PREVIEW_PLURAL, body)
        name = obj["metadata"]["name"]
        try:
            deadline = time.monotonic() + timeout
            while True:
                status = obj.get("status") or {}
                if status.get("phase") in ("succeeded", "failed"):
                    return status
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no answer within {timeout:g} s")
                time.sleep(0.1)
                obj = self.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PREVIEW_PLURAL, name)
        finally:
            try:
                self.custom.delete_namespaced_custom_object(
                    GROUP, VERSION, namespace, PREVIEW_PLURAL, name, propagation_policy="Background"
                )
            except ApiException as e:
                if e.status != 404:
                    raise
