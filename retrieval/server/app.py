"""The app: `create_app` over one Searcher, `serve` for `clipdex serve`, JSON errors, and the
middlewares every request passes (body limit, Host, Origin, HEAD, the pages' CSP).

Errors are JSON objects `{"error": message}` with the domain exception's own `http_status`
(index.errors) and a message in the request's terms (fields, not the CLI's flags:
`service.in_request_terms`); a bug is a JSON 500 whose traceback stays in the log. Every GET
route answers HEAD. Only requests whose Host names this server are answered (DNS rebinding),
and a request from a web page (an Origin header) only from this server's own page or a
`--cors` origin: /knn-service and /metadata take JSON sent as text/plain, which any page could
otherwise post without a CORS preflight. JSON is written by `JSONAnswer`, so a file name that
is not UTF-8 is escaped, not a 500. The API docs (/docs, /redoc) load Swagger UI and ReDoc
from this server (the fastapi-offline package), not from a CDN, so they work offline; and a
Content-Security-Policy on every HTML page keeps the browser from asking any other host.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import __version__
from index.errors import ClipdexError

from ..search import Searcher
from .compat import compat
from .media import DEFAULT_LIMITS, Limits
from .models import JSONAnswer
from .routes import api
from .service import INDICES, Service, in_request_terms

__all__ = ["LOOPBACK", "PAGE_POLICY", "create_app", "serve"]

STATIC = Path(__file__).parent / "static"
FAVICON = "/static/favicon.svg"
# Swagger UI's validator badge would send the schema's URL to validator.swagger.io
SWAGGER_UI = {"validatorUrl": None}
# What a page of this server may load: only from this server. ReDoc's sidebar would show
# Redocly's logo from its CDN (a call home on every view; the image hides itself when
# refused); Swagger UI starts from an inline script and both style inline.
PAGE_POLICY = ("default-src 'self'; script-src 'self' 'unsafe-inline'; "
               "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
               "worker-src 'self' blob:; object-src 'none'; base-uri 'none'; "
               "frame-ancestors 'none'")
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the Host names always answered
log = logging.getLogger("clipdex.server")


# --- errors, limits, the app ----------------------------------------------------------------
def _error(status: int, message: str, **extra: Any) -> JSONAnswer:
    return JSONAnswer({"error": message, **extra}, status_code=status)


def _validation_details(errors: Sequence[dict]) -> list[dict]:
    # only JSON-safe parts: an error's `input` may be bytes that are not UTF-8
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _invalid(errors: Sequence[dict]) -> JSONAnswer:
    details = _validation_details(errors)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body")
    return _error(422, f"invalid request: {where + ': ' if where else ''}{first['msg']}",
                  detail=details)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def domain_error(_: Request, exc: ClipdexError) -> JSONAnswer:
        return _error(exc.http_status, in_request_terms(str(exc)))

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONAnswer:
        return _invalid(exc.errors())

    @app.exception_handler(ValidationError)
    async def body_invalid(_: Request, exc: ValidationError) -> JSONAnswer:
        return _invalid(exc.errors(include_url=False, include_input=False))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONAnswer:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONAnswer:
        log.exception("unexpected error")  # a bug: keep the traceback in the log, not the reply
        return _error(500, f"internal error ({type(exc).__name__}); see the server log")


class BodyLimit:
    """Refuse request bodies over `max_bytes` with a JSON 413, whatever Content-Length says.

    The body is read (up to the limit) before the app runs and replayed to it, so a lying or
    absent Content-Length (chunked uploads) cannot get past the limit.
    """

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, scope: dict, receive: Any, send: Any) -> None:
        response = _error(413, f"request body too large (limit {self.max_bytes:,} bytes)")
        await response(scope, receive, send)


def _replay(body: bytes, receive: Any) -> Any:
    sent = False

    async def replayed() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as servers do
    return replayed


class HostCheck:
    """Answer only requests whose Host header names this server; a JSON 400 otherwise.

    A page on evil.example whose name is re-pointed at 127.0.0.1 (DNS rebinding) reaches a
    loopback server as same-origin, but its requests still say `Host: evil.example`.
    Starlette's TrustedHostMiddleware answers in plain text and cuts "[::1]:8765" at its
    first colon, hence this one.
    """

    def __init__(self, app: Any, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = frozenset(_host_name(h) for h in allowed_hosts) - {""}
        self.names = ", ".join(allowed_hosts)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or _host_name(_header(scope, b"host")) in self.allowed:
            return await self.app(scope, receive, send)
        host = _header(scope, b"host")[:100]
        response = _error(400, f"this server does not answer to Host {host!r}, only to "
                               f"{self.names}; start it with --allow-host NAME to add a name")
        await response(scope, receive, send)


class OriginCheck:
    """Refuse (JSON 403) what a web page of another origin asks, unless it is a --cors origin.

    /knn-service and /metadata read JSON whatever its Content-Type (clip-front posts
    text/plain, ClipClient sends none), so any page could post to them without a CORS
    preflight. Browsers name the page in Origin on such requests; Python clients and curl
    send none, and this server's own page sends its own origin.
    """

    def __init__(self, app: Any, cors_origins: Sequence[str]) -> None:
        self.app = app
        self.cors = frozenset(o.strip().rstrip("/").lower() for o in cors_origins)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        origin = _header(scope, b"origin").strip().lower()
        if scope["type"] != "http" or not origin or self._allowed(origin, scope):
            return await self.app(scope, receive, send)
        response = _error(403, f"requests from web pages at {origin[:100]!r} are refused; "
                               f"start the server with --cors ORIGIN to allow that page")
        await response(scope, receive, send)

    def _allowed(self, origin: str, scope: dict) -> bool:
        if "*" in self.cors or origin in self.cors:
            return True
        own = _header(scope, b"host").strip().lower()  # already checked by HostCheck
        try:
            return bool(own) and urlsplit(origin).netloc == own
        except ValueError:  # "http://[": not a URL, so not this server's page
            return False


class HeadAsGet:
    """Answer HEAD as the GET of the same URL would, without the body (routes are GET only)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)

        async def headers_only(message: dict) -> None:
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)
        await self.app({**scope, "method": "GET"}, receive, headers_only)


class PagePolicy:
    """Give every HTML page (the web page, /docs, /redoc) a Content-Security-Policy that keeps
    the browser from loading anything from another host."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_policy(message: dict) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                if dict(headers).get(b"content-type", b"").startswith(b"text/html"):
                    headers.append((b"content-security-policy", PAGE_POLICY.encode()))
                    message = {**message, "headers": headers}
            await send(message)
        await self.app(scope, receive, with_policy)


def _header(scope: dict, name: bytes) -> str:
    for key, value in scope.get("headers") or ():
        if key == name:
            return value.decode("latin-1")
    return ""


def _host_name(value: str) -> str:
    """The name in a Host header or an --allow-host value: no port, no brackets, lower case."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:].partition("]")[0]
    if value.count(":") == 1:  # name:port; more colons: a bare IPv6 address
        value = value.partition(":")[0]
    return value.removesuffix(".")


def create_app(searcher: Searcher, *, limits: Limits = DEFAULT_LIMITS,
               cors_origins: Sequence[str] = (),
               allowed_hosts: Sequence[str] = LOOPBACK) -> FastAPI:
    """The ASGI app over one library's Searcher.

    Args:
        searcher: answers the queries; it catches up with `clipdex index` runs by itself.
        limits: request size, image pixels, concurrent decodes and the thumbnail cache.
        cors_origins: web origins allowed to call the API from a browser (e.g. a clip-front).
        allowed_hosts: the names (the Host header, port ignored) the server answers to.
    """
    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from the
    # fastapi-offline package (under /static-offline-docs), not from a CDN
    app = FastAPIOffline(title="clipdex", version=__version__,
                         default_response_class=JSONAnswer, favicon_url=FAVICON,
                         swagger_ui_parameters=SWAGGER_UI,
                         description="CLIP search over a photo library and its captions, "
                                     "plus the clip-retrieval API (ClipClient, clip-front).")
    app.state.service = Service(searcher, limits)
    _add_error_handlers(app)
    app.include_router(api)
    app.include_router(compat)
    app.add_api_route("/", _index_page, include_in_schema=False)
    app.add_api_route("/favicon.ico", _favicon, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(PagePolicy)
    app.add_middleware(BodyLimit, max_bytes=limits.max_request_bytes)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"])
    app.add_middleware(OriginCheck, cors_origins=cors_origins)  # the last added runs first
    app.add_middleware(HostCheck, allowed_hosts=allowed_hosts)
    app.add_middleware(HeadAsGet)
    return app


def _index_page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


def _favicon() -> FileResponse:
    # browsers ask /favicon.ico of pages that name no icon (an image opened from the page)
    return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")


def serve(*, home: str | os.PathLike | None = None, db: str | None = None,
          host: str = "127.0.0.1", port: int = 8765, precision: str = "auto",
          cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
          echo: Any = print) -> None:
    """Open the library, load its model, and serve until interrupted.

    The server answers to the loopback names, `host` and `allowed_hosts` (Host header).
    """
    import uvicorn

    names = list(dict.fromkeys([*LOOPBACK, host, *allowed_hosts]))
    searcher = Searcher.open(home, db=db, precision=precision,
                             notify=lambda message: echo(f"warning: {message}"))
    try:
        _warm(searcher)
        if host not in LOOPBACK:
            echo(f"warning: listening on {host}: anyone who can reach it can search this "
                 f"library and fetch its images; it answers to the names {', '.join(names)} "
                 f"(add others with --allow-host NAME)")
        app = create_app(searcher, cors_origins=cors_origins, allowed_hosts=names)

        async def listening() -> None:  # said once the app starts, not before
            echo(f"serving {searcher.library.settings.home} on http://{_netloc(host, port)}/ "
                 f"(API docs at /docs)")

        app.router.on_startup.append(listening)
        try:
            uvicorn.run(app, host=host, port=port, log_level="info")
        except SystemExit as exc:  # uvicorn exits 3 when it cannot start (e.g. bind fails)
            if not exc.code:
                raise
            raise ClipdexError(f"the server could not start on http://{_netloc(host, port)}/ "
                               f"(uvicorn's reason is above)") from None
    finally:
        searcher.close()


def _warm(searcher: Searcher) -> None:
    """Load the model and indexes now, so the first query is not the slow one."""
    if searcher.library.model is None:
        return  # an empty library: queries say so until `clipdex index` fills it
    embedder = searcher.embedder
    embedder.encode_texts(["warm up"])  # loads the text tower, runs one pass
    if getattr(embedder, "runs_on_onnx", lambda tower: False)("image"):  # its own session
        from PIL import Image

        size = embedder.image_size
        embedder.encode_images([Image.new("RGB", (size, size))])
    for target in INDICES:
        searcher.index_for(target)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
