"""clip-retrieval's API, so LAION's ClipClient and clip-front can use a clipdex library:
/knn-service, /indices-list and /metadata.

Their bodies are parsed here, not by FastAPI: clip-front posts JSON as text/plain and
ClipClient sends no Content-Type. The indices are this library's two vector indexes,
`images` and `captions`; an image arrives as base64 bytes (this server fetches nothing from
the network, so `image_url` is refused).
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from index.errors import NotFound, UsageProblem

from .media import decode_base64
from .models import JSONAnswer, KnnHit, KnnRequest, MetadataItem, MetadataRequest
from .routes import ServiceDep
from .service import INDICES, TARGET_OF_MODALITY, KnnParams, UrlFor

__all__ = ["compat"]

compat = APIRouter(tags=["clip-retrieval"])


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


def _url_for(request: Request) -> UrlFor:
    def url_for(image_id: int) -> str:
        return str(request.url_for("image_original", image_id=str(image_id)))
    return url_for


@compat.post("/knn-service", openapi_extra=_json_schema_body(KnnRequest),
             responses={200: {"model": list[KnnHit]}},
             summary="clip-retrieval knn: nearest images or captions to a text/image/embedding")
async def knn_service(request: Request, service: ServiceDep) -> JSONAnswer:
    body = KnnRequest.model_validate(await _json_object(request))
    params = _knn_params(body)
    return JSONAnswer(await run_in_threadpool(service.knn, params, _url_for(request)))


@compat.get("/indices-list", summary="clip-retrieval: the indices this server has")
def indices_list() -> list[str]:
    return list(INDICES)


@compat.post("/metadata", openapi_extra=_json_schema_body(MetadataRequest),
             responses={200: {"model": list[MetadataItem]}},
             summary="clip-retrieval: caption, image_path and url by id")
async def metadata(request: Request, service: ServiceDep) -> JSONAnswer:
    body = MetadataRequest.model_validate(await _json_object(request))
    target = _target(body.indice_name, "image")
    found = await run_in_threadpool(service.metadata, body.ids, target, _url_for(request))
    return JSONAnswer([{"id": i, "metadata": found.get(i, {})} for i in body.ids])
