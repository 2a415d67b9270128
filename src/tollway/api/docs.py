"""``/docs``: the Swagger UI over ``/openapi.json``, with its assets served from an installed package.

FastAPI's own ``/docs`` page loads Swagger UI's script and stylesheet from a CDN, so without
internet it is a blank page. Here the page points at ``/docs/assets/…`` and those files come
from the ``fastapi-offline`` package's copy of Swagger UI (read once, kept in memory).
"""

from __future__ import annotations

import functools
from importlib import resources
from typing import Final

from fastapi import APIRouter
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, Response

from tollway.api.errors import ApiError

ASSETS_PACKAGE: Final = "fastapi_offline"
ASSETS_URL: Final = "/docs/assets"
ASSETS: Final = {
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui.css": "text/css",
    "favicon.png": "image/png",
}
ASSET_MAX_AGE_S: Final = 86_400

router = APIRouter(include_in_schema=False)


@router.get("/docs")
async def swagger_ui() -> HTMLResponse:
    """The Swagger UI page; every asset it loads is served by this service."""
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="tollway API",
        swagger_js_url=f"{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_URL}/favicon.png",
    )


@router.get(ASSETS_URL + "/{name}")
async def swagger_asset(name: str) -> Response:
    """One of Swagger UI's files; anything else is 404."""
    media_type = ASSETS.get(name)
    if media_type is None:
        raise ApiError("not_found", f"no docs asset {name!r}")
    return Response(_asset(name), media_type=media_type, headers={"Cache-Control": f"max-age={ASSET_MAX_AGE_S}"})


@functools.cache
def _asset(name: str) -> bytes:
    return resources.files(ASSETS_PACKAGE).joinpath("static", name).read_bytes()
