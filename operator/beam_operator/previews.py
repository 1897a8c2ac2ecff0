"""The BeamPreview controller: one preview Job per BeamPreview, its answer copied into status.

A preview counts, measures and samples a window with the organization's own Snowflake
credentials, which only workers receive (docs/security.md): so the operator runs it as a Job in
the organization's namespace, as it runs staging, and reads the worker's termination message
(beam_contract.preview.PreviewResult). Nothing here is shared with the backfill controller but
the Kubernetes client: previews have their own labels, so the backfills' Job watch never sees
their Jobs.

Each BeamPreview gets one asyncio task, from its first event until it is deleted: run the Job,
watch its Pod, write the status, then delete the BeamPreview `preview_ttl_seconds` after it
ended (the REST API deletes its own as soon as it has answered). After a restart the watch's
first list hands every BeamPreview back, and a task picks each up where it was.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError

from beam_contract.model import GROUP, VERSION, parse_timestamp, utc_iso
from beam_contract.preview import PREVIEW_PLURAL, PreviewPhase, PreviewResult, PreviewSpec, PreviewStatus
from beam_contract.worker import parse_failure

from . import child_jobs
from .config import OperatorConfig
from .kubeclient import ApiError, KubeApi
from .observe import PodObs

log = logging.getLogger("beam_operator.previews")

POLL_SECONDS = 0.25  # how often a running preview's Pod is looked at: previews are few and short


def _path(namespace: str, name: str = "") -> str:
    base = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{PREVIEW_PLURAL}"
    return f"{base}/{quote(name)}" if name else base


def status_of(result: PreviewResult, chunk_target_bytes: int) -> PreviewStatus:
    estimated = int(result.num_rows * result.bytes_per_row)
    return PreviewStatus(
        phase=PreviewPhase.SUCCEEDED,
        num_rows=result.num_rows,
        estimated_bytes=estimated,
        # staging writes at least one chunk for a window with rows, none for an empty one
        estimated_chunks=max(1, math.ceil(estimated / chunk_target_bytes)) if result.num_rows else 0,
        columns=result.columns,
        sample=result.sample(),
        sample_truncated=result.sample_truncated,
        columns_truncated=result.columns_truncated or None,
    )


def failed(message: str) -> PreviewStatus:
    return PreviewStatus(phase=PreviewPhase.FAILED, error_message=message)


def answer(pod: PodObs, chunk_target_bytes: int) -> PreviewStatus:
    """What a finished preview Pod said, as the BeamPreview's status."""
    if pod.succeeded:
        try:
            return status_of(PreviewResult.model_validate_json(pod.message), chunk_target_bytes)
        except ValidationError:
            return failed("the preview worker ended without a readable answer (no termination message)")
    error, _, _ = parse_failure(pod.message)
    if not error:
        error = f"the preview worker failed ({pod.reason or 'Error'}, exit code {pod.exit_code})"
    return failed(error)


class Previews:
    def __init__(self, config: OperatorConfig, api: KubeApi) -> None:
        self.config, self.api = config, api
        self.tasks: dict[tuple[str, str], asyncio.Task] = {}
        self.running = asyncio.Semaphore(config.max_running_previews)

    def on_event(self, kind: str, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("uid", ""))
        if kind == "DELETED":
            task = self.tasks.pop(key, None)
            if task is not None:
                task.cancel()
            return
        if key in self.tasks or meta.get("deletionTimestamp"):
            return
        task = asyncio.get_running_loop().create_task(self._handle(obj), name=f"preview {key[0]}/{meta.get('name')}")
        self.tasks[key] = task
        task.add_done_callback(lambda t, k=key: self.tasks.pop(k, None) if self.tasks.get(k) is t else None)

    async def stop(self) -> None:
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _handle(self, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        try:
            phase = (obj.get("status") or {}).get("phase")
            if phase not in (PreviewPhase.SUCCEEDED, PreviewPhase.FAILED):
                status = await self._run(ns, name, uid, obj.get("spec") or {})
                status.time_completed = utc_iso(datetime.now(UTC))
                await self._write(ns, name, status)
                log.info(
                    "preview %s/%s %s: %s",
                    ns,
                    name,
                    status.phase,
                    f"{status.num_rows} rows, {status.estimated_chunks} chunks"
                    if status.phase == PreviewPhase.SUCCEEDED
                    else status.error_message,
                )
            created = parse_timestamp(meta.get("creationTimestamp") or utc_iso(datetime.now(UTC)))
            left = created.timestamp() + self.config.preview_ttl_seconds - time.time()
            if left > 0:
                await asyncio.sleep(left)
            await self.api.request("DELETE", _path(ns, name), body={"preconditions": {"uid": uid}}, ok=(404, 409))
        except asyncio.CancelledError:
            raise
        except Exception:  # one preview's trouble must not end the operator's loop
            log.exception("preview %s/%s", ns, name)

    async def _run(self, ns: str, name: str, uid: str, raw: dict[str, Any]) -> PreviewStatus:
        try:
            spec = PreviewSpec.model_validate(raw)
        except ValidationError as e:  # the CRD validated it; a newer field this model lacks
            return failed(f"spec not understood by this operator: {e.errors()[0].get('msg', '')}")
        if not self.config.table_allowed(spec.table):
            allowed = ", ".join(self.config.allowed_tables)
            return failed(f"table {spec.table} is not allowed by this operator; allowed tables: {allowed}")
        if not child_jobs.preview_fits(spec):
            return failed(
                "the filter and transforms are too large to preview (over 32 KiB together); preview with "
                "fewer filter values (the backfill itself takes up to 10,000) or shorter scripts"
            )
        async with self.running:
            job = child_jobs.preview_job(name, ns, uid, spec, self.config)
            job_name = job["metadata"]["name"]
            t0 = time.monotonic()
            await self.api.create_job(ns, job)
            await self._write(ns, name, PreviewStatus(phase=PreviewPhase.RUNNING))
            deadline = t0 + self.config.preview_timeout_seconds + 5
            while time.monotonic() < deadline:
                pods = await self.api.finished_pods(ns, job_name)
                if pods:
                    pod = max(pods.values(), key=lambda p: p.finished_at)
                    status = answer(pod, self.config.chunk_target_bytes)
                    status.worker_seconds = round(time.monotonic() - t0, 2)
                    return status
                await asyncio.sleep(POLL_SECONDS)
            return failed(
                f"the preview did not answer within {self.config.preview_timeout_seconds:g} s "
                "(its Pod did not start, or Snowflake did not answer); look at the Job's Events: "
                f"kubectl -n {ns} describe job {job_name}"
            )

    async def _write(self, ns: str, name: str, status: PreviewStatus) -> None:
        try:
            await self.api.request(
                "PATCH",
                _path(ns, name) + "/status",
                body={"status": status.document()},
                content_type="application/merge-patch+json",
            )
        except ApiError as e:
            if e.status != 404:  # deleted meanwhile: nobody waits for it any more
                raise
