"""The web console's pages, served by beam-api under /console (docs/console.md).

Server-rendered HTML (Jinja2, every value escaped) with one small script of our own for live
updates, the form's helpers and the preview; every page works for reading without it. Each
page reads and writes the same BeamBackfill resources through the same calls as the REST API,
with the same key checks and limits: a session names an API key (console.sessions), and every
request re-checks it and takes from that key's rate limit.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

import jinja2
import orjson
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from kubernetes.client import ApiException
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from beam_contract.model import TRANSFORM_ERROR_PREFIX, Phase
from beam_contract.preview import PreviewSpec
from beam_operator.api.kube import events_of, status_message
from beam_operator.api.public_job import creation_order, field_path, public_status

from . import forms, views
from .sessions import COOKIE, PATH, SIGN_IN_COOKIE, Session, Sessions, cookie_attributes, csrf_ok

HERE = Path(__file__).parent
STATUSES = [p.value for p in Phase]
# No inline script or style anywhere, no third-party origin: what a crafted job name could
# inject has nothing to run with.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}


class NotSignedIn(Exception):
    pass


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


# autoescape=True for every template, whatever its name: a job name is user input.
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True, undefined=jinja2.StrictUndefined
)
_ENV.filters["count"] = lambda n: "–" if n is None else f"{n:,}"
_ENV.filters["duration"] = _duration
templates = Jinja2Templates(env=_ENV)


def error_page(request: Request, code: int, message: str, headers: dict[str, str]) -> Response:
    return templates.TemplateResponse(
        request,
        "error.html",
        {"session": None, "csrf": "", "statuses": STATUSES, "code": code, "message": message},
        status_code=code,
        headers=headers,
    )


def add_console(app: FastAPI, *, settings, backfills, previews, keys, core, identify, buckets, preview_answer) -> None:
    sessions = Sessions(settings.session_secret or secrets.token_urlsafe(32), settings.session_max_age_seconds)
    app.mount(f"{PATH}/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        if request.url.path.startswith(PATH):
            for k, v in SECURITY_HEADERS.items():
                response.headers.setdefault(k, v)
            if request.url.path.startswith(f"{PATH}/static/"):
                response.headers["Cache-Control"] = "public, max-age=300"
        return response

    @app.exception_handler(NotSignedIn)
    async def _sign_in_first(request: Request, exc: NotSignedIn) -> Response:
        if request.url.path.startswith(f"{PATH}/api/"):
            return Response(orjson.dumps({"detail": "not signed in"}), 401, media_type="application/json")
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"{PATH}/sign-in?next={quote(target)}", 303)

    def signed_in(request: Request) -> Session:
        """The request's session, re-checked against the key store, and one token of that key's
        rate limit (the console's requests count as the key's requests)."""
        s = sessions.read(request.cookies.get(COOKIE))
        if s is None:
            raise NotSignedIn()
        now = keys.identity(s.key_id)
        if now is None or now != (s.fingerprint, s.organization):
            raise NotSignedIn()  # the key was revoked (or replaced): the session ends with it
        wait = buckets.take(s.key_id)
        if wait:
            raise HTTPException(429, "rate limit of this key exceeded; wait a moment", headers={"Retry-After": "1"})
        return s

    async def form_of(request: Request) -> dict[str, str]:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            raise HTTPException(413, f"request body over {settings.max_body_bytes} bytes")
        body = b""
        async for part in request.stream():
            body += part
            if len(body) > settings.max_body_bytes:
                raise HTTPException(413, f"request body over {settings.max_body_bytes} bytes")
        return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))

    def require_csrf(s: Session, presented: str | None) -> None:
        if not csrf_ok(s.csrf, presented):
            raise HTTPException(403, "the form's CSRF token is missing or wrong: reload the page and try again")

    def page(request: Request, name: str, s: Session | None, status_code: int = 200, **context: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request,
            name,
            {"session": s, "csrf": s.csrf if s else "", "statuses": STATUSES, **context},
            status_code=status_code,
        )

    # --- signing in and out --------------------------------------------------------------

    @app.get(PATH, include_in_schema=False)
    def _root() -> Response:
        return RedirectResponse(f"{PATH}/backfills", 303)

    @app.get(f"{PATH}/sign-in", include_in_schema=False)
    def sign_in_page(request: Request, next: str = "") -> Response:
        token = secrets.token_urlsafe(24)
        response = page(request, "sign_in.html", None, sign_in_csrf=token, next=_local(next), error="")
        response.set_cookie(SIGN_IN_COOKIE, token, **cookie_attributes(_secure(request), 600))
        return response

    @app.post(f"{PATH}/sign-in", include_in_schema=False)
    async def sign_in(request: Request) -> Response:
        form = await form_of(request)
        target = _local(form.get("next", ""))
        if not csrf_ok(request.cookies.get(SIGN_IN_COOKIE), form.get("csrf")):
            raise HTTPException(403, "the sign-in form's CSRF token is missing or wrong: reload the page")
        client = request.client.host if request.client else ""
        try:
            key = await run_in_threadpool(identify, client, form.get("key", "").strip() or None)
        except HTTPException as e:
            token = secrets.token_urlsafe(24)
            response = page(
                request, "sign_in.html", None, e.status_code, sign_in_csrf=token, next=target, error=str(e.detail)
            )
            response.set_cookie(SIGN_IN_COOKIE, token, **cookie_attributes(_secure(request), 600))
            return response
        fingerprint, organization = await run_in_threadpool(keys.identity, key.key_id) or ("", "")
        response = RedirectResponse(target or f"{PATH}/backfills", 303)
        response.set_cookie(
            COOKIE,
            sessions.issue(key.key_id, organization, fingerprint),
            **cookie_attributes(_secure(request), sessions.max_age),
        )
        response.delete_cookie(SIGN_IN_COOKIE, path=PATH)
        return response

    @app.post(f"{PATH}/sign-out", include_in_schema=False)
    async def sign_out(request: Request) -> Response:
        s = sessions.read(request.cookies.get(COOKIE))
        form = await form_of(request)
        if s is not None:
            require_csrf(s, form.get("csrf"))
        response = RedirectResponse(f"{PATH}/sign-in", 303)
        response.delete_cookie(COOKIE, path=PATH, httponly=True, samesite="strict", secure=_secure(request))
        return response

    # --- the list ------------------------------------------------------------------------

    def rows(organization: str, status: str | None) -> list[dict[str, Any]]:
        kept = []
        for chunk in backfills.pages(organization):
            for o in chunk:
                if status and public_status(o) != status:
                    continue
                kept.append((creation_order(o), views.progress_view(o)))
        kept.sort(key=lambda kv: kv[0], reverse=True)  # newest first
        return [v for _, v in kept]

    def status_param(status: str | None) -> str | None:
        return status if status in STATUSES else None

    @app.get(f"{PATH}/backfills", include_in_schema=False)
    def list_page(request: Request, status: str | None = None) -> Response:
        s = signed_in(request)
        listed = rows(s.organization, status_param(status))
        return page(request, "list.html", s, backfills=listed, status=status_param(status) or "")

    @app.get(f"{PATH}/api/backfills", include_in_schema=False)
    def list_json(request: Request, status: str | None = None) -> Response:
        s = signed_in(request)
        return Response(orjson.dumps(rows(s.organization, status_param(status))), media_type="application/json")

    # --- one backfill --------------------------------------------------------------------

    def found(s: Session, job_id: str) -> dict[str, Any]:
        obj = backfills.find(s.organization, job_id[:64])
        if obj is None:
            raise HTTPException(404, f"backfill {job_id} not found in organization {s.organization}")
        return obj

    @app.get(f"{PATH}/backfills/{{job_id}}", include_in_schema=False)
    def detail_page(request: Request, job_id: str) -> Response:
        s = signed_in(request)
        obj = found(s, job_id)
        events = events_of(core, s.organization, obj["metadata"]["uid"])
        return page(
            request,
            "detail.html",
            s,
            b=views.progress_view(obj),
            manifest=views.manifest_yaml(obj),
            conditions=(obj.get("status") or {}).get("conditions") or [],
            events=events,
            actions=views.actions(obj),
        )

    @app.get(f"{PATH}/api/backfills/{{job_id}}", include_in_schema=False)
    def detail_json(request: Request, job_id: str) -> Response:
        s = signed_in(request)
        obj = found(s, job_id)
        return Response(
            orjson.dumps({**views.progress_view(obj), "actions": views.actions(obj)}), media_type="application/json"
        )

    @app.get(f"{PATH}/backfills/{{job_id}}/manifest.yaml", include_in_schema=False)
    def manifest(request: Request, job_id: str) -> Response:
        s = signed_in(request)
        obj = found(s, job_id)
        return Response(
            views.manifest_yaml(obj),
            media_type="application/yaml",
            headers={"Content-Disposition": f'attachment; filename="{obj["metadata"]["name"]}.yaml"'},
        )

    @app.post(f"{PATH}/backfills/{{job_id}}/{{action}}", include_in_schema=False)
    async def act(request: Request, job_id: str, action: str) -> Response:
        s = await run_in_threadpool(signed_in, request)
        form = await form_of(request)
        require_csrf(s, form.get("csrf"))
        await run_in_threadpool(_act, s, job_id, action)
        return RedirectResponse(f"{PATH}/backfills/{quote(job_id)}", 303)

    def _act(s: Session, job_id: str, action: str) -> None:
        for _ in range(5):
            obj = found(s, job_id)
            if action not in views.actions(obj):
                raise HTTPException(409, f"cannot {action} backfill {job_id} now: it is {public_status(obj)}")
            spec = obj.get("spec") or {}
            change = {
                "cancel": {"cancel": True},
                "suspend": {"suspend": True},
                "resume": {"suspend": False},
                "retry": {"retry": max(spec.get("retry") or 0, (obj.get("status") or {}).get("attempt") or 1)},
            }[action]
            try:
                backfills.patch_spec(
                    s.organization, obj["metadata"]["name"], obj["metadata"]["resourceVersion"], change
                )
                return
            except ApiException as e:
                if e.status != 409:  # 409: changed under us (a progress write): judge it again
                    raise
        raise HTTPException(503, "the backfill kept changing; try again")

    # --- starting one --------------------------------------------------------------------

    def secret_names(organization: str) -> list[str]:
        """Secret names the organization's backfills already use: offered by name (the API can
        not list Secrets, by design: docs/console.md)."""
        names = set()
        for chunk in backfills.pages(organization):
            for o in chunk:
                for d in (o.get("spec") or {}).get("destinations") or []:
                    names.update(v for k in ("secret", "hash_key") if isinstance(v := d.get(k), str))
        return sorted(names)

    def new_page(request: Request, s: Session, form: dict[str, str], errors: dict[str, list[str]], code: int = 200):
        return page(
            request,
            "new.html",
            s,
            code,
            form=form,
            errors=errors,
            tables=settings.allowed_tables,
            sinks=forms.SINKS,
            sink_fields=forms.SINK_FIELDS,
            slots=range(forms.DESTINATION_SLOTS),
            secret_names=secret_names(s.organization),
        )

    @app.get(f"{PATH}/new", include_in_schema=False)
    def new_form(request: Request) -> Response:
        s = signed_in(request)
        return new_page(request, s, forms.defaults(), {})

    @app.post(f"{PATH}/new", include_in_schema=False)
    async def create(request: Request) -> Response:
        s = await run_in_threadpool(signed_in, request)
        form = await form_of(request)
        require_csrf(s, form.get("csrf"))
        body, slots = forms.body_of(form)
        try:
            uid = await run_in_threadpool(_create, s.organization, body)
        except Refused as e:
            return await run_in_threadpool(new_page, request, s, form, forms.errors_by_field(e.detail, slots), 422)
        return RedirectResponse(f"{PATH}/backfills/{quote(uid)}", 303)

    def _create(organization: str, body: dict[str, Any]) -> str:
        from beam_contract.model import BackfillSpec

        try:
            spec = BackfillSpec.model_validate(body)
        except ValidationError as e:
            raise Refused(_detail(e)) from None
        try:
            obj = backfills.create(organization, spec.model_dump(mode="json", exclude_none=True))
        except ApiException as e:
            if e.status == 422:  # the CRD's schema or CEL: the same words kubectl would show
                message, causes = status_message(e)
                detail = [
                    {"field": c.get("field", "").removeprefix("spec."), "msg": c.get("message", "")} for c in causes
                ]
                raise Refused(detail or [{"field": "", "msg": message}]) from None
            if e.status == 404:
                raise Refused([{"field": "", "msg": f"organization {organization} is not provisioned"}]) from None
            raise
        return obj["metadata"]["uid"]

    @app.post(f"{PATH}/api/preview", include_in_schema=False)
    async def preview(request: Request) -> Response:
        s = await run_in_threadpool(signed_in, request)
        require_csrf(s, request.headers.get("x-csrf-token"))
        form = await form_of(request)
        body = forms.source_of(form)
        try:
            spec = PreviewSpec.model_validate({**body, "sample_rows": 5})
        except ValidationError as e:
            return _errors(forms.errors_by_field(_detail(e)))
        try:
            answer = await run_in_threadpool(preview_answer, s.organization, spec)
        except HTTPException as e:
            # A script the worker refused or that failed on a row: shown under the script.
            field = "transform_script" if TRANSFORM_ERROR_PREFIX in str(e.detail) else "form"
            return _errors({field: [str(e.detail)]}, e.status_code)
        return Response(orjson.dumps(answer), media_type="application/json")


class Refused(Exception):
    def __init__(self, detail: list[dict[str, Any]]) -> None:
        self.detail = detail


def _detail(e: ValidationError) -> list[dict[str, Any]]:
    return [{"field": field_path(err.get("loc", ())), "msg": err.get("msg", "")} for err in e.errors()]


def _errors(errors: dict[str, list[str]], code: int = 422) -> Response:
    return Response(orjson.dumps({"errors": errors}), code, media_type="application/json")


def _local(target: str) -> str:
    """Only a path of the console itself: never another origin (an open redirect)."""
    return target if target.startswith(f"{PATH}/") and not target.startswith("//") and "\\" not in target else ""
