"""The Kubernetes calls the controller and its recorders make, as Protocols: kubeclient.KubeApi
implements them all, and a test can hand in a recorder of calls with only the ones it needs.

Objects travel as the API's own JSON (dicts); namespaces and names as strings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from .events import Event


class StatusWriter(Protocol):
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> dict[str, Any] | None:
        """Merge-patch the status subresource: the object as stored after it, None if it is gone."""
        ...


class EventPoster(Protocol):
    async def post_event(self, body: dict[str, Any], ev: Event) -> None:
        """Record `ev` on the object `body`; logs a refusal rather than raising it."""
        ...


class Kube(StatusWriter, EventPoster, Protocol):
    """Every write the controller makes. Each is safe to repeat: a create that finds the object
    answers False, a delete of a missing object is quiet."""

    async def create_job(self, namespace: str, manifest: dict[str, Any]) -> bool: ...
    async def create_config_map(self, namespace: str, manifest: dict[str, Any]) -> bool: ...
    async def create_secret(self, namespace: str, manifest: dict[str, Any]) -> bool: ...
    async def delete_job(self, namespace: str, name: str) -> None: ...
    async def suspend_job(self, namespace: str, name: str, suspend: bool) -> None: ...
    async def get_backfill(self, namespace: str, name: str) -> dict[str, Any] | None: ...
    async def delete_backfill(self, namespace: str, name: str, uid: str) -> dict[str, Any] | None: ...
    async def add_finalizer(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str | None
    ) -> dict[str, Any] | None: ...
    async def remove_finalizer(
        self, namespace: str, name: str, uid: str, finalizers: list[str], finalizer: str
    ) -> bool: ...
    async def close(self) -> None: ...
