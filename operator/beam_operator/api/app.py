"""The Beam backfills REST API: a thin FastAPI service over BeamBackfill resources.

Endpoints are sync functions on purpose: FastAPI runs them in its thread pool, where the
blocking Kubernetes client is fine. The request body is validated by the same pydantic model
that generates the CRD, so the API refuses exactly what `kubectl apply` would.
"""

# No `from __future__ import annotations`: FastAPI resolves the endpoint annotations, which
# refer to names local to create_app.
import heapq
import os
import time
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader
from kubernetes.client import ApiException, CoreV1Api
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from urllib3.exceptions import HTTPError as Urllib3Error

from beam_contract.model import TERMINAL, TIMESTAMP_RE, BackfillSpec, Phase, workflow_id
from beam_contract.preview import PreviewSpec
from beam_operator.api import preview as preview_mod
from beam_operator.api.keys import ApiKey, KeyStore
from beam_operator.api.kube import Backfills, Previews, api_client, status_message
from beam_operator.api.public_job import (
    CancelResponse,
    CreateResponse,
    ErrorBody,
    Job,
    creation_order,
    field_path,
    job_view,
    public_status,
)
from beam_operator.api.ratelimit import TokenBuckets, retry_after_header

PREFIX = "/api/v1/beam"
IDENTIFIED = "beam.caller"  # the scope key under which BodyGuard leaves the caller's ApiKey


class RequestTimer:
    """beam_api_request_duration_seconds{route,method,code}: the route's template, never a job id,
    so the label set stays bounded."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from .metrics import REQUEST_SECONDS

        t0, code = time.perf_counter(), [500]

        async def sent(message) -> None:
            if message["type"] == "http.response.start":
                code[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        finally:
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            REQUEST_SECONDS.labels(route=route, method=scope["method"], code=str(code[0])).observe(
                time.perf_counter() - t0
            )


class BodyGuard:
    """ASGI middleware in front of every request with a body: the caller is identified (key,
    limits) before a byte of the body is read, and a body over max_body_bytes is refused with
    413 before it is parsed, by its Content-Length or, without one, as it arrives. One large
    POST, with or without a key, can then not fill the API Pod's memory."""

    def __init__(self, app, *, identify, max_body_bytes: int) -> None:
        self.app, self.identify, self.max = app, identify, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            return await self.app(scope, receive, send)
        if not scope["path"].startswith(PREFIX):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        client = scope["client"][0] if scope.get("client") else ""
        try:
            scope[IDENTIFIED] = await run_in_threadpool(self.identify, client, headers.get("x-api-key"))
        except HTTPException as e:
            return await _send_json(send, e.status_code, {"detail": e.detail}, e.headers or {})
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max):
            return await _send_json(send, 413, {"detail": self._too_large()}, {"Connection": "close"})
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max and not refused:
                    # Answered here; the app then sees the client gone and stops reading.
                    refused = True
                    await _send_json(send, 413, {"detail": self._too_large()}, {"Connection": "close"})
                    return {"type": "http.disconnect"}
            return message

        async def unless_refused(message) -> None:
            if not refused:  # the app's own answer to a body it never got in full
                await send(message)

        await self.app(scope, counted, unless_refused)

    def _too_large(self) -> str:
        return f"request body over {self.max} bytes; a backfill's spec is far smaller (at most 10,000 filter values)"


async def _send_json(send, status: int, content: Any, headers: dict[str, str]) -> None:
    body = orjson.dumps(content)
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


@dataclass
class Settings:
    keys_namespace: str = "beam-system-api-keys"  # the chart's default for release namespace beam-system
    rate_per_second: float = 10.0
    rate_burst: int = 20
    key_cache_seconds: float = 5.0
    # A create's body: 10,000 filter values of 42-character addresses are about 470 KB.
    max_body_bytes: int = 1024 * 1024
    # Backfills per list request to the apiserver (the REST list and cancel page through them).
    list_page_size: int = 100
    # The console (docs/console.md): the tables its start form offers (the operator's
    # allowed_tables; empty: a free text field), the secret that signs session cookies (empty: a
    # random one per process, so sessions end when it restarts and do not cross replicas), how
    # long a session lasts, and how long a preview may take before the API answers 504.
    allowed_tables: tuple[str, ...] = ()
    session_secret: str = ""
    session_max_age_seconds: int = 8 * 3600
    preview_timeout_seconds: float = 30.0

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        return cls(
            keys_namespace=env.get("BEAM_API_KEYS_NAMESPACE") or cls.keys_namespace,
            rate_per_second=float(env.get("BEAM_API_RATE_LIMIT_PER_SECOND") or cls.rate_per_second),
            rate_burst=int(env.get("BEAM_API_RATE_LIMIT_BURST") or cls.rate_burst),
            key_cache_seconds=float(env.get("BEAM_API_KEY_CACHE_SECONDS") or cls.key_cache_seconds),
            max_body_bytes=int(env.get("BEAM_API_MAX_BODY_BYTES") or cls.max_body_bytes),
            list_page_size=int(env.get("BEAM_API_LIST_PAGE_SIZE") or cls.list_page_size),
            allowed_tables=tuple(t.strip() for t in (env.get("BEAM_API_ALLOWED_TABLES") or "").split(",") if t.strip()),
            session_secret=env.get("BEAM_API_SESSION_SECRET") or "",
            session_max_age_seconds=int(env.get("BEAM_API_SESSION_MAX_AGE_SECONDS") or cls.session_max_age_seconds),
            preview_timeout_seconds=float(env.get("BEAM_API_PREVIEW_TIMEOUT_SECONDS") or cls.preview_timeout_seconds),
        )


def _json(content: Any) -> Response:
    # Serialized directly: the answers are plain dicts already, and a long list through
    # response_model validation would cost more than reading it from the apiserver.
    return Response(orjson.dumps(content), media_type="application/json")


ERRORS = {
    401: {"model": ErrorBody, "description": "X-API-Key missing or not valid."},
    429: {"model": ErrorBody, "description": "Rate limit of this key exceeded; see Retry-After."},
}


def create_app(settings: Settings | None = None, kubeconfig: str | None = None, *, connect: bool = True) -> FastAPI:
    """connect=False builds the app without Kubernetes access, only to publish its OpenAPI document."""
    settings = settings or Settings.from_env()
    client = api_client(kubeconfig) if connect else None
    backfills = Backfills(client, page_size=settings.list_page_size)
    previews = Previews(client)
    keys = KeyStore(CoreV1Api(client), settings.keys_namespace, ttl=settings.key_cache_seconds)
    if connect:
        keys.watch()
    buckets = TokenBuckets(settings.rate_per_second, settings.rate_burst)
    failures = TokenBuckets(settings.rate_per_second, settings.rate_burst)

    app = FastAPI(
        title="Beam backfills API",
        version="1.0.0",
        description="Create, list and cancel backfills. Every job is a BeamBackfill resource in the "
        "organization's namespace; this API only reads and writes those resources.",
    )

    @app.exception_handler(RequestValidationError)
    def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = []
        for err in exc.errors():
            detail.append(
                {
                    "loc": list(err.get("loc", ())),
                    "msg": err.get("msg", ""),
                    "type": err.get("type", ""),
                    "field": field_path(err.get("loc", ())),
                }
            )
        return JSONResponse(status_code=422, content={"detail": detail})

    @app.exception_handler(ApiException)
    def _kube_refused(request: Request, exc: ApiException) -> JSONResponse:
        message, causes = status_message(exc)
        # An RBAC denial of this service's own identity is not the caller's doing; any other 403
        # (a quota, an admission webhook) is a refusal of the request and is passed on.
        own_identity = exc.status == 401 or (exc.status == 403 and 'User "' in message and " cannot " in message)
        if exc.status is not None and 400 <= exc.status < 500 and not own_identity:
            if exc.status == 422:
                # The same shape as the API's own 422, so a script handles both alike.
                detail = [
                    {
                        "loc": ["body", *c.get("field", "").removeprefix("spec.").split(".")],
                        "msg": c.get("message", ""),
                        "type": c.get("reason", ""),
                        "field": c.get("field", "").removeprefix("spec."),
                    }
                    for c in causes
                ]
                detail = detail or [{"loc": ["body"], "msg": message, "type": "Invalid", "field": ""}]
                return JSONResponse(status_code=422, content={"detail": detail, "message": message})
            return JSONResponse(status_code=exc.status, content={"detail": message})
        # 5xx means Kubernetes is unwell, and a refused identity means a misconfigured deployment;
        # either way the caller is not at fault and may retry later.
        return JSONResponse(status_code=503, content={"detail": f"Kubernetes API unavailable: {message or exc.reason}"})

    @app.exception_handler(Urllib3Error)
    def _kube_unreachable(request: Request, exc: Urllib3Error) -> JSONResponse:
        return JSONResponse(status_code=503, content={"detail": "Kubernetes API unreachable"})

    @app.exception_handler(StarletteHTTPException)
    def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        headers = dict(exc.headers or {})
        if request.url.path.startswith("/console/") and not request.url.path.startswith("/console/api/"):
            return console_error(request, exc.status_code, str(exc.detail), headers)
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path; list every method.
            methods = sorted(
                {
                    m
                    for r in app.routes
                    if isinstance(r, APIRoute) and r.path_regex.match(request.url.path)
                    for m in r.methods
                }
            )
            headers["Allow"] = ", ".join(methods)
        return JSONResponse(status_code=exc.status_code, content={"detail": exc.detail}, headers=headers)

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The organization's API key.")

    def identify(client: str, key: str | None) -> ApiKey:
        """The caller's organization, or an HTTPException (401, 429). A stored key is known
        from the keys' watch and never meets the failure limit; any other key meets it before
        anything costs the apiserver a request."""
        found = keys.authenticate(key, fetch=False)
        if found is None and not keys.known(key):
            wait = failures.peek(client)
            if wait:
                raise HTTPException(
                    429,
                    "too many requests with a missing or invalid X-API-Key",
                    headers={"Retry-After": retry_after_header(wait)},
                )
        found = found or keys.authenticate(key)
        if found is None:
            failures.take(client)
            raise HTTPException(401, "missing or invalid X-API-Key" if key else "missing X-API-Key header")
        wait = buckets.take(found.key_id)
        if wait:
            raise HTTPException(
                429,
                f"rate limit of {settings.rate_per_second:g} requests/s (burst {settings.rate_burst}) exceeded for this key",
                headers={"Retry-After": retry_after_header(wait)},
            )
        return found

    def caller(request: Request, key: Annotated[str | None, Depends(api_key_header)]) -> ApiKey:
        # A request with a body was identified by the body guard before its body was read.
        early = request.scope.get(IDENTIFIED)
        return early if early is not None else identify(request.client.host if request.client else "", key)

    Caller = Annotated[ApiKey, Depends(caller)]

    app.add_middleware(BodyGuard, identify=identify, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(RequestTimer)

    @app.get("/healthz", include_in_schema=False)
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        # Without a key, as /healthz: request counts and latencies, no organization's data.
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    @app.post(
        f"{PREFIX}/backfills",
        response_model=CreateResponse,
        summary="Create backfill",
        operation_id="create_backfill",
        responses={
            **ERRORS,
            413: {"model": ErrorBody, "description": "The body is larger than the API's limit (api.maxBodyBytes)."},
            200: {
                "links": {
                    "CancelBackfill": {
                        "operationId": "cancel_backfill",
                        "parameters": {"job_id": "$response.body#/job_id"},
                    }
                }
            },
            400: {"model": ErrorBody, "description": "The body is not JSON."},
            422: {"model": ErrorBody, "description": "The body is not valid; each item names its field."},
            403: {"model": ErrorBody, "description": "The organization is not provisioned (no namespace)."},
        },
    )
    def create_backfill(spec: BackfillSpec, who: Caller) -> Any:
        # exclude_none: unset optional fields stay absent in the resource, as in a hand-written one.
        body = spec.model_dump(mode="json", exclude_none=True)
        try:
            obj = backfills.create(who.organization, body)
        except ApiException as e:
            if e.status == 404:
                raise HTTPException(
                    403, f"organization {who.organization} is not provisioned: its namespace does not exist"
                ) from None
            raise
        uid = obj["metadata"]["uid"]
        return _json({"job_id": uid, "workflow_id": workflow_id(who.organization, uid)})

    @app.get(
        f"{PREFIX}/backfills",
        response_model=list[Job],
        summary="List backfills",
        operation_id="list_backfills",
        description="All backfills of the caller's organization, oldest first (ascending creation time).",
        responses=ERRORS,
    )
    def list_backfills(
        who: Caller,
        status: Annotated[Phase | None, Query(description="Only jobs in this status.")] = None,
        limit: Annotated[
            int | None, Query(ge=1, le=100000, description="At most this many jobs: the oldest ones.")
        ] = None,
    ) -> Any:
        # A page at a time, keeping only the answer's views (and with a limit only the oldest
        # `limit` of them): never the whole namespace's objects at once.
        kept: list[tuple[tuple[str, str, str], dict[str, Any]]] = []
        for page in backfills.pages(who.organization):
            for o in page:
                if status and public_status(o) != status:
                    continue
                kept.append((creation_order(o), job_view(o)))
            if limit and len(kept) > limit:
                kept = heapq.nsmallest(limit, kept, key=lambda kv: kv[0])
        kept.sort(key=lambda kv: kv[0])
        return _json([view for _, view in (kept[:limit] if limit else kept)])

    @app.post(
        f"{PREFIX}/backfills/{{job_id}}/cancel",
        response_model=CancelResponse,
        summary="Cancel backfill",
        operation_id="cancel_backfill",
        responses={
            **ERRORS,
            404: {"model": ErrorBody, "description": "No such job in the caller's organization."},
            409: {"model": ErrorBody, "description": "The job has already ended (completed, failed or cancelled)."},
        },
    )
    def cancel_backfill(job_id: Annotated[str, Path(max_length=64)], who: Caller) -> Any:
        for _ in range(5):
            obj = backfills.find(who.organization, job_id)
            if obj is None:
                raise HTTPException(404, f"backfill {job_id} not found")
            current = public_status(obj)
            if current in TERMINAL:
                raise HTTPException(
                    409, f"backfill {job_id} has already ended with status {current}; there is nothing to cancel"
                )
            try:
                backfills.request_cancel(who.organization, obj["metadata"]["name"], obj["metadata"]["resourceVersion"])
            except ApiException as e:
                if e.status == 409:  # changed under us (progress write): judge it again
                    continue
                if e.status == 404:
                    raise HTTPException(404, f"backfill {job_id} not found") from None
                raise
            return _json(
                {
                    "job_id": job_id,
                    "workflow_id": workflow_id(who.organization, job_id),
                    "status": current,
                    "cancel_requested": True,
                }
            )
        raise HTTPException(503, "the backfill kept changing while cancelling; retry")

    def preview_answer(organization: str, spec: PreviewSpec) -> dict[str, Any]:
        """Run a preview for the organization (a BeamPreview the operator answers) and add the
        duration estimate; HTTPException for what the caller should see."""
        try:
            status = previews.run(
                organization, spec.model_dump(mode="json", exclude_none=True), settings.preview_timeout_seconds
            )
        except TimeoutError:
            raise HTTPException(
                504,
                f"the preview did not answer within {settings.preview_timeout_seconds:g} s; "
                "the operator may be busy or stopped: try again",
            ) from None
        except ApiException as e:
            if e.status == 404:
                raise HTTPException(
                    403, f"organization {organization} is not provisioned: its namespace does not exist"
                ) from None
            raise
        if status.get("phase") != "succeeded":
            raise HTTPException(422, status.get("error_message") or "the preview failed")
        history = (o for page in backfills.pages(organization) for o in page)
        return preview_mod.answer(status, history)

    @app.post(
        f"{PREFIX}/backfills/preview",
        response_model=preview_mod.Preview,
        summary="Preview backfill",
        operation_id="preview_backfill",
        description="What creating this body would stage, before anything runs: the window's row count, the "
        "estimated staged bytes and chunks, the columns with their types, the first rows as a destination "
        "would receive them, and an estimate of the duration. The body is a create body, validated the same "
        "way; nothing is created. The counting runs as a short worker Job in the organization's namespace.",
        responses={
            **ERRORS,
            413: {"model": ErrorBody, "description": "The body is larger than the API's limit (api.maxBodyBytes)."},
            400: {"model": ErrorBody, "description": "The body is not JSON."},
            422: {
                "model": ErrorBody,
                "description": "The body is not valid, or the preview failed (no such table or column, a table "
                "the operator does not allow): the detail says why.",
            },
            403: {"model": ErrorBody, "description": "The organization is not provisioned (no namespace)."},
            504: {"model": ErrorBody, "description": "The preview did not answer in time (api.previewTimeoutSeconds)."},
        },
    )
    def preview_backfill(
        spec: BackfillSpec,
        who: Caller,
        sample_rows: Annotated[int, Query(ge=0, le=10, description="Rows of the sample to return.")] = 5,
    ) -> Any:
        return _json(preview_answer(who.organization, PreviewSpec.of(spec, sample_rows)))

    from beam_operator.console.routes import add_console, error_page

    def console_error(request: Request, code: int, message: str, headers: dict[str, str]) -> Response:
        return error_page(request, code, message, headers)

    add_console(
        app,
        settings=settings,
        backfills=backfills,
        previews=previews,
        keys=keys,
        core=CoreV1Api(client),
        identify=identify,
        buckets=buckets,
        preview_answer=preview_answer,
    )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            # The model checks timestamps in a validator, which its JSON schema cannot show;
            # publishing the pattern lets clients (and fuzzers) build valid windows.
            window = doc["components"]["schemas"]["TimestampWindow"]["properties"]
            for bound in ("start", "end"):
                window[bound]["pattern"] = TIMESTAMP_RE
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def openapi_document() -> dict[str, Any]:
    return create_app(Settings(), connect=False).openapi()
