"""clipdex's HTTP server (FastAPI): the search API, the web page, and clip-retrieval's API.

    /api/search, /api/search/upload    search by text and/or image → `clipdex search --json`
    /api/caption, /api/caption/upload  captions for an uploaded image
    /api/images/{id}[/thumbnail]       an indexed image by id (never by path), only while its
                                       file is still the regular image file that was indexed
    /api/examples                      a few of the library's captions, to try as queries
    /api/stats, /api/health
    /knn-service, /indices-list, /metadata   what LAION's ClipClient and clip-front call
    /                                  the web page
    /docs, /redoc                      the OpenAPI docs (Swagger UI, ReDoc), served offline

Every query goes through the one pipeline (`retrieval.search.Searcher`), as for the CLI and
Python; the server only turns requests into terms and answers into JSON.

    app      create_app, serve; JSON errors; the body-limit, Host, Origin and HEAD middlewares
    routes   the /api routes            compat   the clip-retrieval routes
    models   request and response shapes (pydantic), and the JSON they are written as
    service  the adapter: requests → Terms and a Query → Searcher → answers
    media    uploads and their limits, decoding, indexed files, thumbnails
    static/  the web page
"""

from .app import create_app, serve
from .media import Limits

__all__ = ["Limits", "create_app", "serve"]
