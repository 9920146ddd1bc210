"""clipdex's own API under /api: search (query string, JSON, multipart), captions for an
image, indexed images and thumbnails by id, example queries, stats and health.

Each route spells its request in HTTP's terms (query string, JSON body, form fields), which
also makes the OpenAPI docs, and hands a `SearchParams` to the Service; what the routes return
is the same object as `clipdex search --json`.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi import Path as PathParam
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from starlette.background import BackgroundTask

from .media import THUMBNAIL_SIZES, decode_base64
from .models import (
    MAX_ID,
    MAX_OFFSET,
    MAX_TERMS,
    MAX_TOP,
    CaptionRequest,
    ExamplesOut,
    FiltersOut,
    SearchOut,
    SearchRequest,
)
from .service import SearchParams, Service

__all__ = ["ServiceDep", "api"]

# ids can be reused after a file is removed: revalidate; and never let a browser sniff a type
IMAGE_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
NOT_SERVED = {"description": "no such image, or its file is not the file that was indexed"}

api = APIRouter(prefix="/api", tags=["clipdex"])


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]
ImageId = Annotated[int, PathParam(ge=0, le=MAX_ID, description="an indexed image's id")]


# --- search ---------------------------------------------------------------------------------
@api.get("/search", response_model=SearchOut, summary="Search by text (query string)")
def search_get(service: ServiceDep,
               text: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: B006
               negatives: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: B006
               target: Literal["images", "captions"] = "images",
               top: Annotated[int, Query(ge=1, le=MAX_TOP)] = 10,
               offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
               threshold: Annotated[float | None, Query(ge=-1.0, le=1.0)] = None,
               under: str | None = None, dedup: bool = False,
               after: str | None = None, before: str | None = None, year: str | None = None,
               month: str | None = None, camera: str | None = None, place: str | None = None,
               near: str | None = None,
               type: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: A002,B006
               tag: Annotated[list[str], Query(max_length=MAX_TERMS)] = [],  # noqa: B006
               sort: Literal["relevance", "date", "-date"] = "relevance") -> dict:
    """`clipdex search` over HTTP, text terms only: `/api/search?text=a+red+circle`; filters
    alone list photos newest first: `/api/search?place=Lisbon&after=2024-06`."""
    params = SearchParams(texts=text, negatives=negatives, target=target, top=top,
                          offset=offset, threshold=threshold, under=under, dedup=dedup,
                          after=after, before=before, year=year, month=month, camera=camera,
                          place=place, near=near, types=type, tags=tag, sort=sort)
    return service.search(params).as_dict()


@api.post("/search", response_model=SearchOut, summary="Search by text and/or base64 images")
def search_json(body: SearchRequest, service: ServiceDep) -> dict:
    texts = [body.text] if isinstance(body.text, str) else list(body.text or [])
    images = [body.image] if isinstance(body.image, str) else list(body.image or [])
    params = SearchParams(texts=texts, images=[decode_base64(i) for i in images],
                          image_id=body.image_id, negatives=body.negatives, target=body.target,
                          top=body.top, offset=body.offset, threshold=body.threshold,
                          under=body.under, dedup=body.dedup, after=body.after,
                          before=body.before,
                          year=None if body.year is None else str(body.year),
                          month=body.month, camera=body.camera, place=body.place,
                          near=body.near,
                          types=[body.type] if isinstance(body.type, str) else body.type or (),
                          tags=[body.tag] if isinstance(body.tag, str) else body.tag or (),
                          sort=body.sort)
    return service.search(params).as_dict()


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
                        dedup: Annotated[bool, Form()] = False,
                        after: Annotated[str | None, Form()] = None,
                        before: Annotated[str | None, Form()] = None,
                        year: Annotated[str | None, Form()] = None,
                        month: Annotated[str | None, Form()] = None,
                        camera: Annotated[str | None, Form()] = None,
                        place: Annotated[str | None, Form()] = None,
                        near: Annotated[str | None, Form()] = None,
                        type: Annotated[list[str], Form()] = [],  # noqa: A002,B006
                        tag: Annotated[list[str], Form()] = [],  # noqa: B006
                        sort: Annotated[Literal["relevance", "date", "-date"],
                                        Form()] = "relevance") -> dict:
    params = SearchParams(texts=text, images=[await f.read() for f in image], image_id=image_id,
                          negatives=negatives, target=target, top=top, offset=offset,
                          threshold=threshold, under=under, dedup=dedup, after=after,
                          before=before, year=year, month=month, camera=camera, place=place,
                          near=near, types=type, tags=tag, sort=sort)
    return (await run_in_threadpool(service.search, params)).as_dict()


@api.post("/caption", response_model=SearchOut, summary="Captions for a base64 image")
def caption_json(body: CaptionRequest, service: ServiceDep) -> dict:
    return service.caption(decode_base64(body.image), top=body.top).as_dict()


@api.post("/caption/upload", response_model=SearchOut,
          summary="Captions for an uploaded image file (multipart)")
async def caption_upload(service: ServiceDep, image: Annotated[UploadFile, File()],
                         top: Annotated[int, Form(ge=1, le=MAX_TOP)] = 5) -> dict:
    data = await image.read()
    return (await run_in_threadpool(service.caption, data, top=top)).as_dict()


# --- images, stats, health ------------------------------------------------------------------
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


@api.get("/duplicates", summary="Groups of near-duplicate images (as `clipdex duplicates "
                                 "--json`), best copy first; nothing is deleted")
def duplicates(service: ServiceDep,
               threshold: Annotated[float, Query(gt=0.0, le=1.0)] = 0.96,
               under: str | None = None) -> dict[str, Any]:
    return service.duplicates(threshold=threshold, under=under)


@api.get("/stats", summary="Library statistics (as `clipdex stats --json`)")
def stats(service: ServiceDep) -> dict[str, Any]:
    return service.stats()


@api.get("/filters", response_model=FiltersOut,
         summary="What the photos offer to filter on (cameras, places, types, dates)")
def filters(service: ServiceDep) -> dict[str, Any]:
    return service.filters()


@api.get("/examples", response_model=ExamplesOut,
         summary="A few of the library's captions to try as queries")
def examples(service: ServiceDep) -> dict[str, list[str]]:
    """Up to five short captions of the library, spread over it; the web page's suggestions."""
    return {"examples": service.examples()}


@api.get("/health", summary="Liveness and library counts")
def health(service: ServiceDep) -> dict[str, Any]:
    return service.health()
