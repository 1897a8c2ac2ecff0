"""kopf wiring: watch events into the Controller, deletion through a finalizer. No logic here.

Watch settings are deliberate (docs/operations.md): the API server ends each watch after
`server_timeout` seconds and kopf re-lists, and the client gives up on a silent connection
after `client_timeout`, so a restarted kube-apiserver is noticed within about a minute
without restarting the operator.
"""

from __future__ import annotations

import logging
import os

import kopf
from prometheus_client import start_http_server

from . import jobs, metrics
from .config import OperatorConfig
from .controller import Controller, KubeApi
from .model import GROUP, PLURAL, VERSION

FINALIZER = f"{GROUP}/cleanup"
_state: dict[str, Controller] = {}


def controller() -> Controller:
    return _state["controller"]


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    config = OperatorConfig.from_env()
    if config.gcs_endpoint:
        # The staging store reads the emulator endpoint from the environment, as workers do.
        os.environ["STORAGE_EMULATOR_HOST"] = config.gcs_endpoint
    # Progress and diff-base in annotations under our own prefix: status stays the public
    # document, and the CRD's structural schema has no room for kopf's bookkeeping.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=GROUP, key="last-handled-configuration")
    settings.persistence.finalizer = FINALIZER
    settings.watching.server_timeout = int(os.environ.get("BEAM_WATCH_SERVER_TIMEOUT", "300"))
    settings.watching.client_timeout = int(os.environ.get("BEAM_WATCH_CLIENT_TIMEOUT", "330"))
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    # We record our own Events on transitions; kopf's per-handler Events would double the writes.
    settings.posting.enabled = False
    settings.networking.request_timeout = 30
    ctl = Controller(config, KubeApi(config), workers=int(os.environ.get("BEAM_WORKERS", "4")))
    _state["controller"] = ctl
    ctl.start()
    if config.metrics_port:
        start_http_server(config.metrics_port)
    logger.info("beam-backfill operator started: bucket=%s prefix=%s image=%s", config.staging_bucket, config.staging_prefix, config.jobrunner_image)


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    if "controller" in _state:
        await _state["controller"].stop()


@kopf.on.event(GROUP, VERSION, PLURAL)
def backfill_event(event: kopf.RawEvent, **_) -> None:
    controller().on_backfill(event["type"], event["object"])
    for status, n in controller().count_by_status().items():
        metrics.BACKFILLS.labels(status=status).set(n)


@kopf.on.event("batch", "v1", "jobs", labels={jobs.LABEL_JOB_ID: kopf.PRESENT})
def job_event(event: kopf.RawEvent, **_) -> None:
    controller().on_job(event["type"], event["object"])


@kopf.on.event("", "v1", "pods", labels={jobs.LABEL_JOB_ID: kopf.PRESENT})
def pod_event(event: kopf.RawEvent, **_) -> None:
    controller().on_pod(event["type"], event["object"])


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def backfill_deleted(body: kopf.Body, **_) -> None:
    if not await controller().finalize(dict(body)):
        raise kopf.TemporaryError("waiting for the backfill's Jobs to be deleted", delay=1)
