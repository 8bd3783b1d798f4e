"""The dashboard at /ui: HTTP glue around proxy/dashboard/ (login, the page, its live events, Load and
Unload for admins, backend log tails); its JavaScript and CSS are static files, under a strict CSP.

Views read the manager's snapshot and the recent requests; state changes only through the manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, redirect, render_template, request
from flask.blueprints import BlueprintSetupState
from werkzeug.wrappers import Response as BaseResponse

from proxy.app_context import ProxyContext
from proxy.auth import keyless_entry, presented_keys
from proxy.dashboard import views
from proxy.dashboard.actions import Actions
from proxy.dashboard.charts import model_charts
from proxy.dashboard.live import Held, StreamSlots, status_events, stream_limit
from proxy.dashboard.sessions import COOKIE, Session, Sessions
from proxy.dashboard.tail import log_path, tail_lines
from proxy.errors import BadRequest, Forbidden, ProxyError, ServerBusy, Unauthorized, render_openai_error
from proxy.peers import is_peer_model
from proxy.pipeline import resolve_model
from proxy.routes.admin import status_body

log = logging.getLogger(__name__)

PACKAGE = Path(__file__).resolve().parent.parent
CSRF_HEADER = "X-CSRF-Token"
STREAM_RETRY_AFTER_S = 10
# default-src 'self' and no 'unsafe-inline': every script and style is a file under /ui/static.
CSP = "default-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'; object-src 'none'"

bp = Blueprint("ui", __name__, template_folder=str(PACKAGE / "templates"),
               static_folder=str(PACKAGE / "static"), static_url_path="/ui/static")


class Dashboard:
    """The dashboard's own state, one per app: sessions, open event streams, running actions."""

    def __init__(self, context: ProxyContext) -> None:
        self.sessions = Sessions(context.config.proxy.state_dir)  # state_dir needs a restart to change
        self.streams = StreamSlots(stream_limit(context.config.proxy.threads))
        self.actions = Actions()
        self.stream_s: float | None = None  # None: live.STREAM_S (tests shorten it)


@bp.record_once
def _create_state(state: BlueprintSetupState) -> None:
    state.app.extensions["ui"] = Dashboard(state.app.extensions["proxy"])


def dashboard() -> Dashboard:
    ui: Dashboard = current_app.extensions["ui"]
    return ui


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who is looking: a key's name (None with auth off), whether it is an admin, and its session."""

    name: str | None
    admin: bool
    session: Session | None  # None: a key sent in a header (curl), or keyless loopback


def current_viewer() -> Viewer | None:
    """Return who the request comes from, or None when nobody logged in.

    A session counts only while its key is still configured with the same value (re-checked on every
    request: a key removed from api_tokens.yml, or rotated, logs its sessions out). A key in a header
    counts as on the API; with proxy.disable_auth the dashboard is open, as the API is.
    Raises Unauthorized for a wrong key in a header.
    """
    context = ProxyContext.current()
    session = dashboard().sessions.read(request.cookies.get(COOKIE))
    keys = context.keys
    if keys.disabled:
        return Viewer(None, True, session)
    if session is not None:
        entry = dashboard().sessions.holder(session, keys)
        if entry is not None:
            return Viewer(entry.name, session.admin and entry.admin, session)
    keyless = keyless_entry(context.config.proxy.loopback_without_key, request.environ.get("REMOTE_ADDR"))
    if presented_keys(request.headers) or keyless is not None:
        entry = keys.check(request.headers, keyless=keyless)
        if entry is not None:
            return Viewer(entry.name, entry.admin, None)
    return None


def require_viewer() -> Viewer:
    viewer = current_viewer()
    if viewer is not None and viewer.name is not None:
        request.environ["proxy.key"] = viewer.name  # for the access log
    if viewer is None:
        raise Unauthorized("log in at /ui/login with an API key first (or your session has ended)")
    return viewer


def require_action(*, admin: bool) -> Viewer:
    """Return the viewer of a state-changing request: it needs a session and that session's CSRF token."""
    viewer = require_viewer()
    if viewer.session is None:
        raise Forbidden("dashboard actions need a dashboard session (log in at /ui/login); API callers use /unload")
    token = request.headers.get(CSRF_HEADER) or request.form.get("csrf_token")
    if not Sessions.csrf_matches(viewer.session, token):
        raise Forbidden(f"missing or wrong CSRF token: reload the dashboard and try again (header {CSRF_HEADER})")
    if admin and not viewer.admin:
        raise Forbidden("this action needs an admin key (admin_key, or a key with admin: true)")
    return viewer


@bp.errorhandler(ProxyError)
def render_error(error: ProxyError) -> Response:
    """An error page for a page the browser navigated to; OpenAI's JSON error for everything else."""
    if request.method == "GET" and request.endpoint in PAGES and request.accept_mimetypes.accept_html:
        response = Response(render_template("ui/error.html", error=error), status=error.status)
        response.headers.update(error.headers())
        return response
    return render_openai_error(error)


@bp.after_request
def protect(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    if request.endpoint != "ui.static":
        response.headers["Cache-Control"] = "no-store"
    return response


# ----- pages ------------------------------------------------------------------------------------

@bp.get("/ui")
@bp.get("/ui/")
def page() -> BaseResponse:
    viewer = current_viewer()
    if viewer is None:
        return redirect("/ui/login", code=303)
    if viewer.name is not None:
        request.environ["proxy.key"] = viewer.name
    context = ProxyContext.current()
    session = viewer.session
    fresh_cookie = None
    if session is None and context.keys.disabled:  # the open dashboard: a session only to carry a CSRF token
        fresh_cookie, session = dashboard().sessions.issue(None)
    status = status_body(context, admin=viewer.admin)
    body = render_template(
        "ui/dashboard.html", viewer=viewer, csrf=session.csrf if session else "",
        actions=viewer.admin and session is not None, status=status, now=datetime.now(timezone.utc),
        views=views, auth=not context.keys.disabled, logs=_logs(context, status) if viewer.admin else {},
        **_recent(context, viewer))
    response = Response(body, mimetype="text/html")
    if fresh_cookie is not None and session is not None:
        _set_cookie(response, fresh_cookie, session)
    return response


@bp.get("/ui/login")
def login_page() -> BaseResponse:
    context = ProxyContext.current()
    if context.keys.disabled:
        return redirect("/ui", code=303)
    viewer = current_viewer() if dashboard().sessions.read(request.cookies.get(COOKIE)) else None
    return Response(render_template("ui/login.html", viewer=viewer), mimetype="text/html")


@bp.post("/ui/login")
def login() -> Response:
    """Exchange a key (sent as on the API: Authorization: Bearer, x-api-key) for a session cookie.

    The key travels in a header, not a form body: proxy/server.py refuses a body without a key
    in its headers before reading it, so ui.js sends the login, and every action, without a body.
    """
    context = ProxyContext.current()
    if context.keys.disabled:
        return jsonify({"key": None, "admin": True})
    if not presented_keys(request.headers):
        raise Unauthorized("enter an API key (the api_key, admin_key or a named key of api_tokens.yml)")
    try:
        entry = context.keys.check(request.headers)
    except Unauthorized:
        log.info("dashboard: a login with an invalid key from %s", request.environ.get("REMOTE_ADDR", "-"))
        raise Unauthorized("invalid API key") from None
    if entry is None:  # auth off: handled above
        raise Unauthorized("invalid API key")
    context.limiter.check(entry)
    request.environ["proxy.key"] = entry.name
    cookie, session = dashboard().sessions.issue(entry)
    log.info("dashboard: key %s logged in (%s)", entry.name, "admin" if entry.admin else "read-only")
    response = jsonify({"key": entry.name, "admin": entry.admin})
    _set_cookie(response, cookie, session)
    return response


@bp.post("/ui/logout")
def logout() -> Response:
    viewer = require_action(admin=False)
    log.info("dashboard: key %s logged out", viewer.name or "-")
    response = jsonify({"logged_out": True})
    response.delete_cookie(COOKIE, path="/ui", httponly=True, samesite="Strict", secure=_secure())
    return response


# ----- live data --------------------------------------------------------------------------------

@bp.get("/ui/events")
def events() -> Response:
    """Server-sent events: /status's JSON on every change and every second (see proxy/dashboard/live.py)."""
    viewer = require_viewer()
    context = ProxyContext.current()
    ui = dashboard()
    slot = ui.streams.take()
    if slot is None:
        raise ServerBusy(f"the dashboard already has {ui.streams.limit} live views open; retry in "
                         f"{STREAM_RETRY_AFTER_S}s", retry_after_s=STREAM_RETRY_AFTER_S)
    provider = current_app.json
    gone = request.environ.get("waitress.client_disconnected")
    cookie = request.cookies.get(COOKIE)
    headers = dict(request.headers)
    environ = dict(request.environ)

    def wanted() -> bool:
        """Go on while the client is there, the proxy runs and the viewer may still look."""
        if (gone is not None and gone()) or context.manager.closed:
            return False
        if context.keys.disabled:
            return True
        session = ui.sessions.read(cookie)
        if session is not None:
            return ui.sessions.holder(session, context.keys) is not None
        keyless = keyless_entry(context.config.proxy.loopback_without_key, environ.get("REMOTE_ADDR"))
        try:
            return context.keys.check(headers, keyless=keyless) is not None
        except ProxyError:
            return False

    def status() -> str:
        return provider.dumps(status_body(context, admin=viewer.admin))

    kwargs: dict[str, Any] = {} if ui.stream_s is None else {"lifetime_s": ui.stream_s}
    chunks = status_events(status, context.recent, wanted, **kwargs)
    response = Response(Held(chunks, slot), mimetype="text/event-stream")
    response.headers["X-Accel-Buffering"] = "no"  # a reverse proxy in front must not hold events back
    return response


@bp.get("/ui/recent")
def recent() -> Response:
    """The recent requests and the charts, as an HTML fragment the page swaps in."""
    viewer = require_viewer()
    body = render_template("ui/_recent.html", **_recent(ProxyContext.current(), viewer))
    return Response(body, mimetype="text/html")


@bp.get("/ui/logs/<model>")
def backend_log(model: str) -> Response:
    viewer = require_viewer()
    if not viewer.admin:
        raise Forbidden("backend logs need an admin key (they hold paths, command lines and tracebacks)")
    context = ProxyContext.current()
    name = resolve_model(context.config, model).name
    path = log_path(context.config.proxy.state_dir, name)
    return jsonify({"model": name, "lines": tail_lines(path) if path is not None else []})


# ----- actions ----------------------------------------------------------------------------------

@bp.post("/ui/load")
def load() -> Response:
    """Load a model as a request would (acquire, then release), in the background: 202 at once."""
    viewer = require_action(admin=True)
    context = ProxyContext.current()
    model = resolve_model(context.config, _model_argument())
    who = viewer.name or "(auth off)"
    if is_peer_model(model):  # the peer's own scheduler loads it, there (as /models/load does)
        started = dashboard().actions.start("load", model.name, who, lambda: context.peers.forward(
            model, "/models/load", {"model": model.upstream_model}))
    else:
        started = dashboard().actions.load(context.manager, model.name, who)
    return _accepted("load", model.name, started)


@bp.post("/ui/unload")
def unload() -> Response:
    """Unload a model once its running requests finish (as /unload), in the background: 202 at once."""
    viewer = require_action(admin=True)
    context = ProxyContext.current()
    model = resolve_model(context.config, _model_argument())
    who = viewer.name or "(auth off)"
    if is_peer_model(model):  # the peer's own scheduler unloads it, there (as /unload does)
        started = dashboard().actions.start("unload", model.name, who, lambda: context.peers.forward(
            model, "/unload", {"model": model.upstream_model}))
    else:
        started = dashboard().actions.unload(context.manager, model.name, who)
    return _accepted("unload", model.name, started)


PAGES = frozenset({"ui.page", "ui.login_page"})


def _model_argument() -> str:
    model = request.args.get("model") or request.form.get("model") or ""
    if not model:
        raise BadRequest("model: required (?model=name)", param="model")
    return model


def _accepted(action: str, model: str, started: bool) -> Response:
    response = jsonify({"action": action, "model": model, "started": started,
                        "note": None if started else f"a {action} of {model} is already running"})
    response.status_code = 202
    return response


def _recent(context: ProxyContext, viewer: Viewer) -> dict[str, Any]:
    records = context.recent.requests()
    now = datetime.now(timezone.utc).timestamp()
    return {"rows": views.request_rows(records, viewer.name, all_keys=viewer.admin),
            "charts": model_charts(records, now), "total": len(records)}


def _logs(context: ProxyContext, status: dict[str, Any]) -> dict[str, list[str]]:
    logs = {}
    for model in status["models"]:
        path = log_path(context.config.proxy.state_dir, model["name"])
        logs[model["name"]] = tail_lines(path) if path is not None else []
    return logs


def _secure() -> bool:
    """Say whether the browser reached us over https (directly, or through a reverse proxy that says so)."""
    return request.is_secure or request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip() == "https"


def _set_cookie(response: Response, value: str, session: Session) -> None:
    sessions = dashboard().sessions
    response.set_cookie(COOKIE, value, max_age=int(sessions.lifetime_s),
                        expires=datetime.fromtimestamp(sessions.expires_at(session), timezone.utc),
                        path="/ui", httponly=True, samesite="Strict", secure=_secure())
