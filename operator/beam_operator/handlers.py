"""kopf wiring: watch events into the Controller, settings from OperatorConfig into kopf. No
logic and no settings of its own here.

kopf watches and the Controller does the rest, deletion included: it adds and removes the
backfill's finalizer itself (controller.FINALIZER) and cleans up in its own queue. kopf's
@kopf.on.delete held the full body of every backfill being deleted in one of its per-object
workers until its clean-up ended, which is what kept the operator's memory up after a mass
expiry (docs/benchmarks.md, "Finished backfills expiring"). With no on.create/update/delete
handler kopf adds no finalizer, and removes only its own (settings.persistence.finalizer, left
at kopf's default: it must never be ours, or kopf would remove ours).

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

from beam_contract.model import GROUP, PLURAL, VERSION
from beam_contract.preview import PREVIEW_PLURAL

from . import child_jobs, metrics
from .config import OperatorConfig
from .controller import Controller, api_connections
from .kubeclient import KubeApi, http_session, login_via_client
from .previews import Previews

_state: dict[str, Controller] = {}
# Read at import, before kopf calls any handler: login() needs it before startup() runs.
CONFIG = OperatorConfig()


def controller() -> Controller:
    return _state["controller"]


class NoDiffBase(kopf.DiffBaseStorage):
    """No diff-base: this operator has no on.create/on.update/on.field handlers.

    kopf builds the diff-base of every watch event, Pods and Jobs included, by deep-copying the
    whole body, and stores it in an annotation (one more patch per backfill). Only handlers
    that react to changes read it; ours read the cache. Profiled at scale, the deep copies were
    the largest single item of the operator's CPU (docs/benchmarks.md, "Earlier figures behind
    the operator's settings"). Add a real storage back before
    adding a handler that needs `old`/`new`/`diff`.
    """

    def build(self, *, body, extra_fields=None):
        return kopf.BodyEssence()

    def fetch(self, *, body):
        return kopf.BodyEssence()  # not None: None would mean "never handled", a create

    def store(self, *, body, patch, essence) -> None:
        pass


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, logger: logging.Logger, **_) -> None:
    config = CONFIG
    if config.gcs_endpoint:
        # The staging store reads the emulator endpoint from the environment, as workers do.
        os.environ["STORAGE_EMULATOR_HOST"] = config.gcs_endpoint
    # Progress in annotations under our own prefix: status stays the public document, and the
    # CRD's structural schema has no room for kopf's bookkeeping. No diff-base (NoDiffBase).
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = NoDiffBase()
    if config.watch_namespaces:
        # Named namespaces, no cluster-wide watch: kopf needs neither the namespaces it would
        # discover nor the CRDs it would scan, so the operator has no cluster-scoped permission.
        settings.scanning.disabled = True
    settings.watching.server_timeout = config.watch_server_timeout
    settings.watching.client_timeout = config.watch_client_timeout
    settings.watching.connect_timeout = 10
    settings.watching.reconnect_backoff = 1.0
    # We record our own Events on transitions; kopf's per-handler Events would double the writes.
    settings.posting.enabled = False
    settings.networking.request_timeout = 30
    # Memory at a full list (start-up, or after kube-apiserver restarted): unpaged, the list of
    # every Job arrives as one response parsed at once, and each object's kopf worker keeps its
    # last full body for `idle_timeout` (5 s by default) after handling it, so the bodies of
    # every backfill and Job were alive together (docs/benchmarks.md, "Earlier figures behind
    # the operator's settings"). Our handlers
    # only copy a few fields into the controller's cache, so workers may exit sooner.
    settings.watching.chunk_size = config.list_chunk_size or None
    settings.queueing.idle_timeout = config.kopf_idle_seconds
    # Filter on the server: without a selector every Job of the cluster, ours or not, would be
    # sent to us, parsed and dropped. Pods are not watched (observe.py reads the few needed).
    settings.watching.label_selectors["batch", "v1", "jobs"] = child_jobs.LABEL_JOB_ID
    # kopf logs one "Handler succeeded" line per watch event at INFO: tens of thousands of lines
    # at scale, each costing CPU. The controller logs what matters (Jobs, transitions).
    if config.log_level.upper() != "DEBUG":
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    api = KubeApi(
        config,
        login=login_via_client(settings),
        connections=config.api_connections or api_connections(config.workers),
        timeout=config.api_timeout_seconds,
    )
    ctl = Controller(config, api, workers=config.workers, event_backlog=config.event_backlog)
    _state["controller"] = ctl
    _state["previews"] = Previews(config, api)
    metrics.BACKFILLS.source = ctl.count_by_status
    metrics.CONTROLLER.source = ctl.controller_state
    ctl.start()
    if config.metrics_port:
        start_http_server(config.metrics_port)
    logger.info(
        "beam-backfill operator started: bucket=%s prefix=%s image=%s",
        config.staging_bucket,
        config.staging_prefix,
        config.jobrunner_image,
    )


@kopf.on.login()
async def login(**kwargs) -> kopf.AiohttpSession | None:
    """kopf's own credentials, in an HTTP session with a bounded connection pool.

    kopf's default session allows unlimited connections: when a burst of backfills arrived at
    once, its per-object workers patched them concurrently over a few hundred TLS connections,
    a large part of the operator's peak memory (docs/benchmarks.md, "Operator at scale": "What
    the benchmark changed in the operator").
    Requests beyond the pool wait for a free connection instead. The long-lived watches (3)
    hold connections too, hence the margin.
    """
    info = kopf.login_via_client(**kwargs)
    if info is None:
        return None
    # No auth=: as_http_headers() carries basic auth too (as_aiohttp_basic_auth is deprecated).
    session = http_session(info, CONFIG.kopf_connections, headers=info.as_http_headers())
    return kopf.AiohttpSession(
        aiohttp_session=session,
        server=info.server,
        default_namespace=info.default_namespace,
        expiration=info.expiration,
    )


@kopf.on.cleanup()
async def cleanup(**_) -> None:
    if "previews" in _state:
        await _state["previews"].stop()
    if "controller" in _state:
        await _state["controller"].stop()


# async: kopf runs a plain function in a thread pool, a thread hop per watch event, and the
# controller's queue belongs to the event loop's thread.
@kopf.on.event(GROUP, VERSION, PLURAL)
async def backfill_event(event: kopf.RawEvent, **_) -> None:
    controller().on_backfill(event["type"], event["object"])


@kopf.on.event("batch", "v1", "jobs", labels={child_jobs.LABEL_JOB_ID: kopf.PRESENT})
async def job_event(event: kopf.RawEvent, **_) -> None:
    controller().on_job(event["type"], event["object"])


@kopf.on.event(GROUP, VERSION, PREVIEW_PLURAL)
async def preview_event(event: kopf.RawEvent, **_) -> None:
    _state["previews"].on_event(event["type"], event["object"])
