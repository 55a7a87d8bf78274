"""`/docs`: Swagger UI served from the server's own paths, with its assets from the `fastapi-swagger`
package (read once, when the app is built), so the page works on hosts and clusters without egress:
FastAPI's own page loads them from a CDN. The validator badge is off too (it would call
validator.swagger.io)."""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import HTMLResponse, Response

ASSETS_PATH = "/docs/assets"
# file in fastapi_swagger/resources -> the type it is served with
ASSET_TYPES = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
}
CACHE = "public, max-age=86400"


def read_assets() -> dict[str, bytes]:
    folder = resources.files("fastapi_swagger") / "resources"
    return {name: (folder / name).read_bytes() for name in ASSET_TYPES}


def add_docs_page(app: FastAPI) -> None:
    """`GET /docs` and its assets under `/docs/assets/`; the app must be built with docs_url=None and
    redoc_url=None (FastAPI's pages would load from a CDN)."""
    assets = read_assets()
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - Swagger UI",
        swagger_js_url=f"{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{ASSETS_PATH}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},
    ).body

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return HTMLResponse(page)

    for name, media_type in ASSET_TYPES.items():
        def serve(body: bytes = assets[name], media_type: str = media_type):
            async def asset() -> Response:
                return Response(body, media_type=media_type, headers={"Cache-Control": CACHE})
            return asset

        app.add_api_route(f"{ASSETS_PATH}/{name}", serve(), methods=["GET"], include_in_schema=False)
