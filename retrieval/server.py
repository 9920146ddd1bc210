"""clipdex's HTTP server (FastAPI): the search API, the web page, and clip-retrieval's API.

    /api/search, /api/search/upload    search by text and/or image → `clipdex search --json`
    /api/caption, /api/caption/upload  captions for an uploaded image
    /api/images/{id}[/thumbnail]       an indexed image by id (never by path), only while its
                                       file is still the regular image file that was indexed
    /api/stats, /api/health
    /knn-service, /indices-list, /metadata   what LAION's ClipClient and clip-front call
    /                                  the web page;  /docs  the OpenAPI docs

Errors are JSON objects `{"error": message}` with a 4xx status; a bug is a JSON 500. Every
GET route answers HEAD. Only requests whose Host names this server are answered (DNS
rebinding), and a request from a web page (an Origin header) only from this server's own page
or a `--cors` origin: /knn-service and /metadata take JSON sent as text/plain, which any page
could otherwise post without a CORS preflight.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from index import __version__
from index.errors import (
    ClipdexError,
    EmptyLibrary,
    ModelMismatch,
    ModelUnavailable,
    UsageProblem,
)

from .search import Searcher
from .server_media import (
    DEFAULT_LIMITS,
    THUMBNAIL_SIZES,
    Limits,
    NotFound,
    TooLarge,
    decode_base64,
)
from .server_models import (
    MAX_ID,
    MAX_OFFSET,
    MAX_TERMS,
    MAX_TEXT,
    MAX_TOP,
    CaptionRequest,
    KnnHit,
    KnnRequest,
    MetadataItem,
    MetadataRequest,
    SearchOut,
    SearchRequest,
)
from .server_service import INDICES, TARGET_OF_MODALITY, KnnParams, SearchParams, Service

__all__ = ["LOOPBACK", "create_app", "serve"]

STATIC = Path(__file__).parent / "static"
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # the Host names always answered
STATUS_OF = {TooLarge: 413, NotFound: 404, EmptyLibrary: 404, ModelMismatch: 409,
             ModelUnavailable: 503, UsageProblem: 400}
# ids can be reused after a file is removed: revalidate; and never let a browser sniff a type
IMAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
log = logging.getLogger("clipdex.server")

api = APIRouter(prefix="/api", tags=["clipdex"])
compat = APIRouter(tags=["clip-retrieval"])


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="an indexed image's id")]


# --- the search API -------------------------------------------------------------------------
@api.get("/search", response_model=SearchOut, summary="Search by text (query string)")
def search_get(service: ServiceDep,
               text: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: B006
               negatives: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: B006
               target: Literal["images", "captions"] = "images",
               top: Annotated[int, Query(ge=1, le=MAX_TOP)] = 10,
               offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
               threshold: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
               under: str | None = None, dedup: bool = False) -> dict:
    """`clipdex search` over HTTP, text terms only: `/api/search?text=a+red+circle`."""
    params = SearchParams(texts=text, negatives=negatives, target=target, top=top,
                          offset=offset, threshold=threshold, under=under, dedup=dedup)
    return service.search(_checked(params)).as_dict()


@api.post("/search", response_model=SearchOut, summary="Search by text and/or base64 images")
def search_json(body: SearchRequest, service: ServiceDep) -> dict:
    texts = [body.text] if isinstance(body.text, str) else list(body.text or [])
    images = [body.image] if isinstance(body.image, str) else list(body.image or [])
    params = SearchParams(texts=texts, images=[decode_base64(i) for i in images],
                          image_id=body.image_id, negatives=body.negatives, target=body.target,
                          top=body.top, offset=body.offset, threshold=body.threshold,
                          under=body.under, dedup=body.dedup)
    return service.search(_checked(params)).as_dict()


@api.post("/search/upload", response_model=SearchOut,
          summary="Search by text and/or uploaded image files (multipart)")
async def search_upload(service: ServiceDep,
                        image: Annotated[list[UploadFile], File()] = [],  # noqa: B006
                        text: Annotated[list[str], Form()] = [],  # noqa: B006
                        negatives: Annotated[list[str], Form()] = [],  # noqa: B006
                        image_id: Annotated[int | None, Form(ge=0, le=MAX_ID)] = None,
                        target: Annotated[Literal["images", "captions"], Form()] = "images",
                        top: Annotated[int, Form(ge=1, le=MAX_TOP)] = 10,
                        offset: Annotated[int, Form(ge=0, le=MAX_OFFSET)] = 0,
                        threshold: Annotated[float | None, Form(ge=-1.0, le=1.0)] = None,
                        under: Annotated[str | None, Form()] = None,
                        dedup: Annotated[bool, Form()] = False) -> dict:
    params = SearchParams(texts=text, images=[await f.read() for f in image], image_id=image_id,
                          negatives=negatives, target=target, top=top, offset=offset,
                          threshold=threshold, under=under, dedup=dedup)
    result = await run_in_threadpool(service.search, _checked(params))
    return result.as_dict()


@api.post("/caption", response_model=SearchOut, summary="Captions for a base64 image")
def caption_json(body: CaptionRequest, service: ServiceDep) -> dict:
    return service.caption(decode_base64(body.image), top=body.top).as_dict()


@api.post("/caption/upload", response_model=SearchOut,
          summary="Captions for an uploaded image file (multipart)")
async def caption_upload(service: ServiceDep, image: Annotated[UploadFile, File()],
                         top: Annotated[int, Form(ge=1, le=MAX_TOP)] = 5) -> dict:
    data = await image.read()
    return (await run_in_threadpool(service.caption, data, top=top)).as_dict()


def _checked(params: SearchParams) -> SearchParams:
    terms = len(params.texts) + len(params.images) + len(params.negatives)
    if terms > MAX_TERMS:
        raise TooLarge(f"{terms} query terms; the limit is {MAX_TERMS}")
    for text in [*params.texts, *params.negatives, params.under or ""]:
        if len(text) > MAX_TEXT:
            raise TooLarge(f"query texts are at most {MAX_TEXT} characters")
    return params


# --- images, stats, health ------------------------------------------------------------------
NOT_SERVED = {"description": "no such image, or its file is not the file that was indexed"}


@api.get("/images/{image_id}", response_class=StreamingResponse,
         summary="An indexed image's original file",
         responses={200: {"content": {"image/*": {}}}, 404: NOT_SERVED})
def image_original(image_id: ImageId, service: ServiceDep) -> StreamingResponse:
    image = service.open_image(image_id)  # served from this very descriptor: no second open
    return StreamingResponse(image.chunks(), media_type=image.media_type,
                             headers={**IMAGE_HEADERS, "Content-Length": str(image.size)},
                             background=BackgroundTask(image.close))


@api.get("/images/{image_id}/thumbnail", summary="An indexed image's JPEG thumbnail",
         responses={200: {"content": {"image/jpeg": {}}}, 404: NOT_SERVED})
def image_thumbnail(image_id: ImageId, service: ServiceDep,
                    size: Annotated[int, Query(
                        ge=16, le=THUMBNAIL_SIZES[-1],
                        description="at most this many pixels, rounded up to one of "
                                    + ", ".join(map(str, THUMBNAIL_SIZES)))] = 256) -> Response:
    data = service.thumbnail(image_id, size=size)
    return Response(data, media_type="image/jpeg", headers=IMAGE_HEADERS)


@api.get("/stats", summary="Library statistics (as `clipdex stats --json`)")
def stats(service: ServiceDep) -> dict[str, Any]:
    return service.stats()


@api.get("/health", summary="Liveness and library counts")
def health(service: ServiceDep) -> dict[str, Any]:
    return service.health()


# --- clip-retrieval compatibility -----------------------------------------------------------
def _json_schema_body(model: type) -> dict:
    """Document a body we parse ourselves (clip-front posts JSON as text/plain)."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": schema}}}}


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise UsageProblem("the request body must be JSON (whatever its Content-Type)") from None
    if not isinstance(data, dict):
        raise UsageProblem("the request body must be a JSON object")
    return data


def _target(indice_name: str | None, modality: str) -> str:
    if indice_name is None:
        return TARGET_OF_MODALITY[modality]
    if indice_name not in INDICES:
        raise NotFound(f"unknown indice_name {indice_name!r}: this server has "
                       f"{', '.join(INDICES)} (see /indices-list)")
    return INDICES[indice_name]


def _knn_params(body: KnnRequest) -> KnnParams:
    if body.image_url and not body.text and not body.image:
        raise UsageProblem("image_url is not supported: this server fetches nothing from the "
                           "network; send the image itself as base64 in `image`")
    return KnnParams(text=body.text, image=decode_base64(body.image) if body.image else None,
                     embedding=body.embedding_input,
                     target=_target(body.indice_name, body.modality),
                     num_images=body.num_images,
                     num_result_ids=body.num_result_ids or body.num_images,
                     deduplicate=body.deduplicate)


def _url_for(request: Request):
    def url_for(image_id: int) -> str:
        return str(request.url_for("image_original", image_id=str(image_id)))
    return url_for


@compat.post("/knn-service", openapi_extra=_json_schema_body(KnnRequest),
             responses={200: {"model": list[KnnHit]}},
             summary="clip-retrieval knn: nearest images or captions to a text/image/embedding")
async def knn_service(request: Request, service: ServiceDep) -> JSONResponse:
    body = KnnRequest.model_validate(await _json_object(request))
    params = _knn_params(body)
    return JSONResponse(await run_in_threadpool(service.knn, params, _url_for(request)))


@compat.get("/indices-list", summary="clip-retrieval: the indices this server has")
def indices_list() -> list[str]:
    return list(INDICES)


@compat.post("/metadata", openapi_extra=_json_schema_body(MetadataRequest),
             responses={200: {"model": list[MetadataItem]}},
             summary="clip-retrieval: caption, image_path and url by id")
async def metadata(request: Request, service: ServiceDep) -> JSONResponse:
    body = MetadataRequest.model_validate(await _json_object(request))
    target = _target(body.indice_name, "image")
    found = await run_in_threadpool(service.metadata, body.ids, target, _url_for(request))
    return JSONResponse([{"id": i, "metadata": found.get(i, {})} for i in body.ids])


# --- errors, limits, the app ----------------------------------------------------------------
def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _status_of(exc: ClipdexError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return 400


def _validation_details(errors: Sequence[dict]) -> list[dict]:
    # only JSON-safe parts: an error's `input` may be bytes that are not UTF-8
    return [{"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", "")),
             "type": str(e.get("type", ""))} for e in errors]


def _invalid(errors: Sequence[dict]) -> JSONResponse:
    details = _validation_details(errors)
    first = details[0] if details else {"loc": [], "msg": "invalid request"}
    where = ".".join(p for p in first["loc"] if p != "body")
    return _error(422, f"invalid request: {where + ': ' if where else ''}{first['msg']}",
                  detail=details)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ClipdexError)
    async def domain_error(_: Request, exc: ClipdexError) -> JSONResponse:
        return _error(_status_of(exc), str(exc))

    @app.exception_handler(RequestValidationError)
    async def request_invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _invalid(exc.errors())

    @app.exception_handler(ValidationError)
    async def body_invalid(_: Request, exc: ValidationError) -> JSONResponse:
        return _invalid(exc.errors(include_url=False, include_input=False))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        response = _error(exc.status_code, str(exc.detail))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
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
    app = FastAPI(title="clipdex", version=__version__,
                  description="CLIP search over a photo library and its captions, plus the "
                              "clip-retrieval API (ClipClient, clip-front).")
    app.state.service = Service(searcher, limits)
    _add_error_handlers(app)
    app.include_router(api)
    app.include_router(compat)
    app.add_api_route("/", _index_page, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
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


def serve(*, home: str | os.PathLike | None = None, db: str | None = None,
          host: str = "127.0.0.1", port: int = 8765, precision: str = "auto",
          cors_origins: Sequence[str] = (), allowed_hosts: Sequence[str] = (),
          echo: Any = print) -> None:
    """Open the library, load its model, and serve until interrupted.

    The server answers to the loopback names, `host` and `allowed_hosts` (Host header).
    """
    import uvicorn

    names = list(dict.fromkeys([*LOOPBACK, host, *allowed_hosts]))
    searcher = Searcher.open(home, db=db, precision=precision)
    try:
        _warm(searcher)
        if host not in LOOPBACK:
            echo(f"warning: listening on {host}: anyone who can reach it can search this "
                 f"library and fetch its images; it answers to the names {', '.join(names)} "
                 f"(add others with --allow-host NAME)")
        echo(f"serving {searcher.library.settings.home} on http://{_netloc(host, port)}/ "
             f"(API docs at /docs)")
        app = create_app(searcher, cors_origins=cors_origins, allowed_hosts=names)
        uvicorn.run(app, host=host, port=port, log_level="info")
    finally:
        searcher.close()


def _warm(searcher: Searcher) -> None:
    """Load the model and indexes now, so the first query is not the slow one."""
    if searcher.library.model is None:
        return  # an empty library: queries say so until `clipdex index` fills it
    searcher.embedder.encode_texts(["warm up"])  # loads the weights, runs one pass
    for target in INDICES:
        searcher.index_for(target)


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
