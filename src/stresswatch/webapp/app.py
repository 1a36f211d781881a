"""The support workers' web app: a starlette application (served by uvicorn).

Routes (JSON unless said otherwise; every ``/api`` answer is ``Cache-Control: no-store``)::

    GET    /                      the page (static/index.html, plain JavaScript, no third-party code)
    POST   /api/session           sign in {worker, password}: the server connects to the broker AS the worker
    GET    /api/session           who is signed in, the CSRF token, the connection state
    DELETE /api/session           sign out                                         (CSRF)
    GET    /api/alerts?state=S    the worker's alerts from the engine (open | acknowledged | resolved | all)
    POST   /api/alerts/{id}/ack       "I'm reaching out": the engine's recorded state   (CSRF)
    POST   /api/alerts/{id}/resolve   {outcome, note}: the engine's recorded state     (CSRF)
    GET    /api/events            Server-Sent Events: connection, engine, alert, update, ping

Security: the session cookie is HttpOnly, SameSite=Strict, Secure when served over TLS, and
names a random server-side session; every state-changing request must carry the session's
CSRF token in ``X-CSRF-Token`` and, when the browser sends one, a same-origin ``Origin``.
A worker acts only through their own broker session, and the engine answers only about
alerts sent to them: nothing in this server decides who sees what.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..wire.acks import AckAction, AckMessage, check_alert_id
from ..alerts.lifecycle import OPEN_STATES, AlertState, Outcome
from ..alerts.topics import Topics, check_id
from ..errors import TransportError
from .bridge import SIGNED_OUT, Event, WorkerBridge

STATIC = Path(__file__).parent / "static"
COOKIE = "sw_session"
STATE_FILTERS: dict[str, tuple[AlertState, ...] | None] = {
    "open": OPEN_STATES,
    "acknowledged": (AlertState.ACKNOWLEDGED,),
    "resolved": (AlertState.RESOLVED,),
    "all": None,
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;"
    " connect-src 'self'; media-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


@dataclass
class WebSettings:
    broker_url: str
    state_dir: Path
    topics: Topics = field(default_factory=Topics)
    protocol: str = "auto"
    tls: bool = False  # served over HTTPS: cookies are Secure
    session_idle_s: float = 12 * 3600
    reply_timeout_s: float = 10.0
    keepalive_s: float = 15.0  # an event-stream ping this often: the page reconnects after ~2.5 missed (laptop sleep)


@dataclass
class Session:
    worker: str
    csrf: str
    bridge: WorkerBridge
    seen_at: float = field(default_factory=time.monotonic)


class Sessions:
    """Signed-in browsers (random tokens) and one broker session per worker, shared by them."""

    def __init__(self, settings: WebSettings) -> None:
        self.settings = settings
        self._by_token: dict[str, Session] = {}
        self._bridges: dict[str, WorkerBridge] = {}
        self._lock = threading.Lock()

    def sign_in(self, worker: str, password: str) -> tuple[str, Session]:
        """Blocking. :class:`TransportError` if the broker refuses the account."""
        with self._lock:
            bridge = self._bridges.get(worker)
        if bridge is None or bridge.connection == SIGNED_OUT or not bridge.matches(password):
            fresh = WorkerBridge(
                self.settings.broker_url, worker, password, self.settings.state_dir, self.settings.topics,
                self.settings.protocol, on_signed_out=self._signed_out,
            )  # fmt: skip
            fresh.connect()  # first: a wrong password must not end the worker's live session
            if bridge is not None:
                bridge.close()
            bridge = fresh
            with self._lock:
                self._bridges[worker] = bridge
        token = secrets.token_urlsafe(32)
        session = Session(worker, secrets.token_urlsafe(32), bridge)
        with self._lock:
            self._by_token[token] = session
        return token, session

    def get(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            s = self._by_token.get(token)
            if s is None:
                return None
            if time.monotonic() - s.seen_at > self.settings.session_idle_s or s.bridge.connection == SIGNED_OUT:
                self._by_token.pop(token, None)
                return None
            s.seen_at = time.monotonic()
            return s

    def sign_out(self, token: str) -> None:
        with self._lock:
            s = self._by_token.pop(token, None)
            if s is None or any(o.bridge is s.bridge for o in self._by_token.values()):
                return
            self._bridges.pop(s.worker, None)
        s.bridge.close()

    def _signed_out(self, bridge: WorkerBridge) -> None:
        """The broker refused the worker's account (removed or password changed): end its sessions."""
        with self._lock:
            for token in [t for t, s in self._by_token.items() if s.bridge is bridge]:
                self._by_token.pop(token)
            if self._bridges.get(bridge.worker) is bridge:
                self._bridges.pop(bridge.worker)

    def close(self) -> None:
        with self._lock:
            bridges, self._bridges, self._by_token = list(self._bridges.values()), {}, {}
        for b in bridges:
            b.close()


def _json(data: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(data, status, headers={"Cache-Control": "no-store"})


def create_app(settings: WebSettings) -> Starlette:
    sessions = Sessions(settings)

    def session_of(request: Request) -> Session | None:
        return sessions.get(request.cookies.get(COOKIE))

    def same_origin(request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True  # not a browser's cross-site form or fetch (those always send Origin)
        scheme = "https" if settings.tls else "http"
        return origin == f"{scheme}://{request.headers.get('host', '')}"

    def guarded(request: Request) -> Session | Response:
        """The session of a state-changing request, or the refusal."""
        s = session_of(request)
        if s is None:
            return _json({"error": "Signed out. Sign in again."}, 401)
        token = request.headers.get("x-csrf-token", "")
        if not same_origin(request) or not secrets.compare_digest(token.encode(), s.csrf.encode()):
            return _json({"error": "The request did not come from this page (CSRF check failed). Reload the page."}, 403)
        return s

    async def index(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def sign_in(request: Request) -> Response:
        if not same_origin(request):
            return _json({"error": "Sign in from this app's own page."}, 403)
        try:
            body = await request.json()
            worker, password = str(body["worker"]).strip(), str(body["password"])
            check_id("worker", worker)
        except (ValueError, KeyError, TypeError):
            return _json({"error": "Enter your worker id and password."}, 400)
        if not password:
            return _json({"error": "Enter your worker id and password."}, 400)
        try:
            token, s = await run_in_threadpool(sessions.sign_in, worker, password)
        except TransportError as exc:
            text = str(exc)
            if "refused" in text or "not authori" in text.lower():
                msg = "Wrong worker id or password (or this account is not a support worker's)."
                return _json({"error": msg}, 401)
            return _json({"error": "The message broker is not reachable right now. Try again in a minute."}, 503)
        resp = _json({"worker": s.worker, "csrf": s.csrf, "connection": s.bridge.connection})
        resp.set_cookie(COOKIE, token, httponly=True, samesite="strict", secure=settings.tls, path="/")
        return resp

    async def whoami(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return _json({"error": "Signed out."}, 401)
        return _json({"worker": s.worker, "csrf": s.csrf, "connection": s.bridge.connection})

    async def sign_out(request: Request) -> Response:
        s = guarded(request)
        if isinstance(s, Response):
            return s
        await run_in_threadpool(sessions.sign_out, request.cookies.get(COOKIE, ""))
        resp = _json({"signed_out": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict", secure=settings.tls)
        return resp

    async def ask_engine(s: Session, msg: AckMessage) -> Response:
        try:
            reply = await run_in_threadpool(s.bridge.request, msg, settings.reply_timeout_s)
        except TransportError as exc:
            return _json({"ok": False, "error": str(exc)}, 504)
        return _json(reply.model_dump(mode="json", exclude_none=True), 200)

    async def alerts(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return _json({"error": "Signed out."}, 401)
        which = request.query_params.get("state", "all")
        if which not in STATE_FILTERS:
            return _json({"error": f"state must be one of {', '.join(STATE_FILTERS)}"}, 400)
        states = STATE_FILTERS[which]
        return await ask_engine(s, AckMessage(action=AckAction.LIST, states=list(states) if states else None))

    async def act(request: Request) -> Response:
        s = guarded(request)
        if isinstance(s, Response):
            return s
        try:
            alert_id = check_alert_id(request.path_params["alert_id"])
        except ValueError as exc:
            return _json({"ok": False, "error": str(exc)}, 400)
        action = request.path_params["action"]
        if action == "ack":
            return await ask_engine(s, AckMessage(alert_id=alert_id, action=AckAction.ACK))
        if action != "resolve":
            return _json({"ok": False, "error": "unknown action"}, 404)
        try:
            body = await request.json()
            outcome = Outcome(body.get("outcome"))
            note = (body.get("note") or "").strip() or None
            msg = AckMessage(alert_id=alert_id, action=AckAction.RESOLVE, outcome=outcome, note=note)
        except (ValueError, AttributeError, TypeError):
            return _json({"ok": False, "error": "Choose an outcome (reached out, no answer, not needed); the note is at most 500 characters."}, 400)
        return await ask_engine(s, msg)

    async def events(request: Request) -> Response:
        s = session_of(request)
        if s is None:
            return _json({"error": "Signed out."}, 401)
        loop, q = s.bridge.subscribe()

        async def stream():  # type: ignore[no-untyped-def]
            try:
                hello = {"state": s.bridge.connection, "keepalive_s": settings.keepalive_s}
                yield f"retry: 2000\n{Event('connection', hello).sse()}{Event('engine', {'state': s.bridge.engine}).sse()}"
                while True:
                    try:
                        ev = await asyncio.wait_for(q.get(), settings.keepalive_s)
                    except asyncio.TimeoutError:
                        yield "event: ping\ndata: {}\n\n"  # a named event: the page's watchdog sees it
                        continue
                    yield ev.sse()
                    if ev.kind == "connection" and ev.data.get("state") == SIGNED_OUT:
                        return
            finally:
                s.bridge.unsubscribe(loop, q)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        yield
        await run_in_threadpool(sessions.close)

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/session", sign_in, methods=["POST"]),
            Route("/api/session", whoami, methods=["GET"]),
            Route("/api/session", sign_out, methods=["DELETE"]),
            Route("/api/alerts", alerts, methods=["GET"]),
            Route("/api/alerts/{alert_id}/{action:str}", act, methods=["POST"]),
            Route("/api/events", events),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ],
        lifespan=lifespan,
    )
    app.state.sessions = sessions
    headers = dict(SECURITY_HEADERS)
    if settings.tls:
        headers["Strict-Transport-Security"] = "max-age=31536000"
    return SecurityHeaders(app, headers)  # type: ignore[return-value]


class SecurityHeaders:
    """Plain ASGI middleware (streams pass through untouched): the same headers on every answer."""

    def __init__(self, app: Starlette, headers: dict[str, str]) -> None:
        self.app = app
        self.state = app.state
        self._headers = [(k.lower().encode(), v.encode()) for k, v in headers.items()]

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self._headers]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)
