"""The HTTP API's request and response shapes (pydantic), which are also its OpenAPI schema,
and the JSON they are written as (`JSONAnswer`).

Every bound a client can push (result counts, offsets, ids, text lengths, number of terms) is
declared here, so a request over it is a 422 before any work is done, and the docs say so.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

__all__ = [
    "MAX_ID",
    "MAX_OFFSET",
    "MAX_RESULT_IDS",
    "MAX_TERMS",
    "MAX_TEXT",
    "MAX_TOP",
    "CaptionRequest",
    "ExamplesOut",
    "FiltersOut",
    "JSONAnswer",
    "KnnHit",
    "KnnRequest",
    "MetadataItem",
    "MetadataRequest",
    "SearchOut",
    "SearchRequest",
]

MAX_TOP = 1000  # hits per page, and clip-retrieval's num_images
MAX_RESULT_IDS = 10_000  # clip-retrieval's num_result_ids, and ids per /metadata call
MAX_OFFSET = 10_000
MAX_TERMS = 16  # texts + images + negatives in one query
MAX_TEXT = 2000  # characters per text; CLIP reads 77 tokens anyway
MAX_ID = 2**63 - 1  # store ids are signed 64-bit; larger numbers cannot name anything


class JSONAnswer(JSONResponse):
    """JSON that also carries file names that are not UTF-8.

    The store keeps such a name as a str with lone surrogates (PEP 383, `'bad_\\udcff.png'`),
    which UTF-8 cannot encode: each is written as its JSON escape (`"\\udcff"`), which
    Python's json reads back to the same str and `os.fsencode` to the same bytes.
    """

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=False, allow_nan=False, indent=None,
                          separators=(",", ":")).encode("utf-8", "backslashreplace")


def _encodable(text: str) -> str:
    # JSON can carry lone surrogates ("\ud800"), which no tokenizer or database accepts
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text is not valid Unicode (lone surrogate)") from None
    return text


def _flag(value: Any) -> Any:
    """clip-retrieval clients send flags as JSON booleans, strings ("true", "False"), or ""."""
    if value is None or value == "":
        return False
    return value.strip().lower() if isinstance(value, str) else value


def _blank_is_none(value: Any) -> Any:
    return None if value is None or (isinstance(value, str) and not value.strip()) else value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


Text = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_encodable)]
Id = Annotated[int, Field(ge=0, le=MAX_ID)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Base64Image = Annotated[str, Field(description="base64 image bytes (a data: URL is fine)")]


class SearchRequest(BaseModel):
    """A search by text and/or images; the same options as `clipdex search`."""

    model_config = ConfigDict(extra="forbid")

    text: Text | list[Text] | None = Field(
        None, description="query text(s); each may carry a `W:` weight prefix, e.g. `2:a dog`")
    image: Base64Image | list[Base64Image] | None = Field(
        None, description="query image(s) as base64 (need not be in the library)")
    image_id: Id | None = Field(None, description="an indexed image to search like")
    negatives: list[Text] = Field(default_factory=list, max_length=MAX_TERMS,
                                  description="texts to steer away from (weight 0.5 unless "
                                              "a `W:` prefix says otherwise)")
    target: Literal["images", "captions"] = "images"
    top: int = Field(10, ge=1, le=MAX_TOP)
    offset: int = Field(0, ge=0, le=MAX_OFFSET)
    threshold: float | None = Field(None, ge=-1.0, le=1.0, allow_inf_nan=False)
    under: Text | None = Field(None, description="only images below this folder")
    dedup: bool = False
    after: Text | None = Field(None, description="taken at or after: YYYY, YYYY-MM, YYYY-MM-DD "
                                                 "or YYYY-MM-DDTHH:MM (camera clock)")
    before: Text | None = Field(None, description="taken before (same forms)")
    year: Text | int | None = Field(None, description="taken in this year")
    month: Text | None = Field(None, description="taken in this month, YYYY-MM")
    camera: Text | None = Field(None, description="camera make/model contains (any case)")
    place: Text | None = Field(None, description="city, region or country contains, or a "
                                                 "country code")
    near: Text | None = Field(None, description="LAT,LON or LAT,LON,KM (default 10 km)")
    type: Text | list[Text] | None = Field(None, description="formats: jpeg, png, heic, ... "
                                                             "(a list, or comma-separated)")
    tag: Text | list[Text] | None = Field(None, description="zero-shot tags (`clipdex tag`), "
                                                            "all must match")
    sort: Literal["relevance", "date", "-date"] = Field(
        "relevance", description="date: oldest first; -date: newest first. With a query the "
                                 "top hits by relevance are put in date order; with filters "
                                 "alone (no text or image) photos are listed newest first")


class CaptionRequest(BaseModel):
    """The library's captions closest to an uploaded image."""

    model_config = ConfigDict(extra="forbid")

    image: Base64Image
    top: int = Field(5, ge=1, le=MAX_TOP)


class TermOut(BaseModel):
    kind: str
    value: str
    weight: float


class QueryOut(BaseModel):
    terms: list[TermOut]
    target: Literal["images", "captions"]
    top: int
    offset: int
    threshold: float | None
    under: str | None
    dedup: bool
    expand: str | None
    filters: dict[str, Any]
    sort: Literal["relevance", "date", "-date"]


class MetaOut(BaseModel):
    """The (linked) image's photo metadata; null fields where the file says nothing."""

    taken_at: str | None = Field(None, description="ISO 8601, the camera's clock (with its "
                                                   "UTC offset when known)")
    taken_at_source: str | None = Field(None, description="DateTimeOriginal, "
                                                          "DateTimeDigitized or mtime")
    camera: str | None = None
    lens: str | None = None
    lat: float | None = None
    lon: float | None = None
    alt: float | None = None
    place: str | None = None
    city: str | None = None
    region: str | None = None
    country: str | None = None
    country_code: str | None = None
    width: int | None = None
    height: int | None = None
    format: str | None = None
    bytes: int | None = None
    tags: list[dict[str, Any]] = Field(default_factory=list,
                                       description="zero-shot tags: group, label, score")


class HitOut(BaseModel):
    id: int
    score: float | None = Field(description="cosine similarity; null when listing by "
                                            "filters alone")
    kind: Literal["image", "caption"]
    path: str | None
    text: str | None
    image_id: int | None
    meta: MetaOut | None = None


class SearchOut(BaseModel):
    """The same object as `clipdex search --json`."""

    query: QueryOut
    hits: list[HitOut]


class FiltersOut(BaseModel):
    """What the library's photos offer to filter on, most common first."""

    cameras: list[str]
    tags: list[str]
    places: list[str]
    types: list[str]
    taken: dict[str, str | None] | None
    with_gps: int


class ExamplesOut(BaseModel):
    """Queries to try, taken from the library's own captions (none without captions)."""

    examples: list[str]


class KnnRequest(BaseModel):
    """clip-retrieval's /knn-service body. Flags may be strings; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    text: Text | None = None
    image: Base64Image | None = None
    image_url: str | None = Field(None, description="refused: this server fetches nothing")
    embedding_input: list[float] | None = Field(None, max_length=65536)
    modality: Annotated[Literal["image", "text"], BeforeValidator(_lower)] = Field(
        "image", description="which index to search when indice_name is not given")
    num_images: int = Field(40, ge=1, le=MAX_TOP)
    num_result_ids: int | None = Field(None, ge=1, le=MAX_RESULT_IDS,
                                       description="default: num_images")
    indice_name: Annotated[str | None, BeforeValidator(_blank_is_none)] = Field(
        None, description="`images` or `captions` (see /indices-list); wins over modality")
    deduplicate: Flag = False
    use_safety_model: Flag = Field(False, description="accepted and ignored (no model)")
    use_violence_detector: Flag = Field(False, description="accepted and ignored (no model)")
    use_mclip: Flag = Field(False, description="accepted and ignored (no model)")
    aesthetic_score: Annotated[int | None, BeforeValidator(_blank_is_none)] = Field(
        None, description="accepted and ignored (no aesthetic embeddings)")
    aesthetic_weight: Annotated[float | None, BeforeValidator(_blank_is_none)] = Field(
        None, description="accepted and ignored (no aesthetic embeddings)")


class KnnHit(BaseModel):
    """One /knn-service result; caption, image_path and url only for the first num_images."""

    id: int
    similarity: float
    caption: str | None = None
    image_path: str | None = None
    url: str | None = None


class MetadataRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    ids: list[Id] = Field(max_length=MAX_RESULT_IDS)
    indice_name: Annotated[str | None, BeforeValidator(_blank_is_none)] = None


class MetadataItem(BaseModel):
    id: int
    metadata: dict[str, Any]
