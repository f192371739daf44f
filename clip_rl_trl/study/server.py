"""``study serve``: the annotators' page as a small Starlette app, run by uvicorn.

Needs the ``study`` extra (``pip install 'clip-rl-trl[study]'``); nothing else in the library imports this module.

Routes: ``/`` (the page), ``/study.js``, ``/study.css``, ``/images/<int>`` (image ``<int>`` of the study: the
path converter accepts digits only, and the index is looked up in the study's own list, so no text of a request
ever becomes a file path), ``GET /api/study`` (the public view of the trials), ``GET /api/progress?annotator=``
(the trials a name has answered, to resume), ``POST /api/answer`` (JSON; validated, appended with fsync).

Security: bound to 127.0.0.1 by default; on a loopback address only ``localhost`` / ``127.0.0.1`` / ``[::1]``
Host headers are accepted (no DNS rebinding); answers must be ``application/json`` (a page elsewhere cannot post
one without a CORS preflight, which is never granted) and at most 4 KiB; every response carries a strict
Content-Security-Policy (scripts, styles and images from this origin only), ``nosniff`` and ``no-referrer``.
"""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clip_rl_trl.study.answers import AnswerError, AnswersLog, normalize_name
from clip_rl_trl.study.design import Study
from clip_rl_trl.study.page import SCRIPT, STYLE, page_html

__all__ = ["BackgroundServer", "build_app", "serve"]

MAX_BODY = 4096
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


class _SecurityHeaders:
    """Pure ASGI middleware: the headers above on every response (also on errors and 404s)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = message.setdefault("headers", [])
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(message: str, status: int, code: str = "invalid") -> JSONResponse:
    return JSONResponse({"error": message, "code": code}, status_code=status)


def _allowed_hosts(host: str) -> list[str]:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return ["localhost", "127.0.0.1", "[::1]", "::1"] if loopback else ["*"]


def build_app(study: Study, answers_path: str | Path, host: str = "127.0.0.1") -> Starlette:
    """The ASGI app of ``study``, appending answers to ``answers_path`` (existing answers are read first: an
    annotator resumes where they stopped)."""
    log = AnswersLog(study, answers_path)
    public = study.public()
    html = page_html("server")

    async def index(request: Request) -> Response:
        return Response(html, media_type="text/html; charset=utf-8", headers={"Cache-Control": "no-store"})

    async def script(request: Request) -> Response:
        return Response(SCRIPT, media_type="text/javascript; charset=utf-8")

    async def style(request: Request) -> Response:
        return Response(STYLE, media_type="text/css; charset=utf-8")

    async def image(request: Request) -> Response:
        path = study.image_path(request.path_params["index"])
        if path is None:
            return _error("no such image", 404)
        return FileResponse(path, headers={"Cache-Control": "private, max-age=3600"})

    async def study_view(request: Request) -> Response:
        return JSONResponse(public)

    async def progress(request: Request) -> Response:
        try:
            name = normalize_name(request.query_params.get("annotator"))
        except AnswerError as err:
            return _error(str(err), err.status)
        done = log.answered(name)
        return JSONResponse({"annotator": name, "answered": [t["id"] for t in study.trials if t["id"] in done]})

    async def answer(request: Request) -> Response:
        if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
            return _error("answers must be sent as application/json", 415)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return _error(f"an answer is at most {MAX_BODY} bytes", 413)
        try:
            record = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return _error("the answer is not valid JSON", 400)
        try:
            # fsync blocks: off the event loop, so other annotators' requests are not held up.
            clean = await run_in_threadpool(log.add, record)
        except AnswerError as err:
            return _error(str(err), err.status, err.code)
        return JSONResponse({"ok": True, "trial": clean["trial"], "answered": len(log.answered(clean["annotator"]))})

    routes = [
        Route("/", index),
        Route("/study.js", script),
        Route("/study.css", style),
        Route("/images/{index:int}", image),
        Route("/api/study", study_view),
        Route("/api/progress", progress),
        Route("/api/answer", answer, methods=["POST"]),
    ]
    middleware = [Middleware(_SecurityHeaders), Middleware(TrustedHostMiddleware, allowed_hosts=_allowed_hosts(host))]
    app = Starlette(routes=routes, middleware=middleware)
    app.state.answers = log
    return app


def serve(study: Study, answers_path: str | Path, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve ``study`` until interrupted (Ctrl-C)."""
    uvicorn.run(build_app(study, answers_path, host), host=host, port=port, log_level="warning")


class BackgroundServer:
    """The study's server in a daemon thread, for tests and scripts: ``start()`` returns once it listens,
    ``stop()`` shuts it down (as Ctrl-C does) within ``timeout`` seconds."""

    def __init__(self, study: Study, answers_path: str | Path, host: str = "127.0.0.1", port: int = 0,
                 timeout: float = 20.0) -> None:
        self.app = build_app(study, answers_path, host)
        config = uvicorn.Config(self.app, host=host, port=port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.timeout = timeout
        self.host = host
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def port(self) -> int:
        """The bound port (the one the OS chose for ``port=0``)."""
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def start(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + self.timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the study server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(self.timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(self.timeout)

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
