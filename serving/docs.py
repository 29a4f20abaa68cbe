"""``GET /docs`` without internet access: the Swagger UI page and its assets served by the app
itself (from the ``swagger-ui-bundle-v2`` package of the ``serve`` extra), never from a CDN.

FastAPI's default page loads Swagger UI's JavaScript and CSS from a CDN, which is a blank page on a
host without internet access. Here the page references only ``/docs/assets/<file>`` routes of the
same server, and Swagger UI's online validator badge is turned off (``validatorUrl: null``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response

ASSET_PREFIX = "/docs/assets"
ASSETS = {  # the files the page needs, and their media types (nothing else is served)
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}


def swagger_ui_dir() -> Path:
    """The directory of the installed Swagger UI distribution."""
    from lrs_rec.extras import require_extra

    bundle = require_extra("swagger_ui_bundle", "the offline /docs page")
    return Path(bundle.swagger_ui_path)


def add_offline_docs(app: FastAPI, *, title: str = "lrs-rec") -> None:
    """``GET /docs`` and ``GET /docs/assets/{name}`` on ``app`` (created with ``docs_url=None``)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{title} — API",
            swagger_js_url=f"{ASSET_PREFIX}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSET_PREFIX}/swagger-ui.css",
            swagger_favicon_url=f"{ASSET_PREFIX}/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
    async def asset(name: str) -> Response:
        media = ASSETS.get(name)
        if media is None:
            return JSONResponse({"error": "Not Found"}, status_code=404)
        try:
            path = swagger_ui_dir() / name
        except ImportError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        return FileResponse(path, media_type=media, headers={"Cache-Control": "max-age=86400"})
