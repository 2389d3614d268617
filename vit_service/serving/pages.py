"""The service's own pages: the web page at `/` and `/ui`, the API docs at `/docs` and `/docs.json`.
(Their routes are GET methods of the service, service.py; this is what they answer.)

BentoML's stock index is a Swagger page that loads Google Tag Manager and badges from outside:
a leak on a private network and a broken look offline. Here `/` serves our page, and `/docs` is
Swagger UI from the assets BentoML ships (served locally under /static_content), with Google Tag
Manager and the online spec validator left out, reading `/docs.json`, which is BentoML's spec
with our title, description and version. Nothing on any of them is fetched from outside.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from starlette.responses import HTMLResponse, JSONResponse, Response

import vit_service
from vit_service.serving.bentoml_compat import api_paths

UI_FILE = Path(__file__).parent / "ui" / "index.html"
TITLE = "vit-service"
DESCRIPTION = (
    "Vision Transformer image classification. POST an image as multipart form field `image` to "
    "/classify (top-k labels), /classify_batch (field `images`, repeated) or /explain (top-k "
    "labels and an attention map; `format=png` for the overlay image). GET /model_info describes "
    "the model. Errors are JSON `{\"error\": ...}` with a 4xx status. A web page is at /ui."
)
# Same-origin only, so the browser itself refuses anything from outside (a second guard beside
# the pages holding no external URL). Swagger UI needs inline styles and its bundled scripts.
CSP = ("default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
       "script-src 'self' 'unsafe-inline'; connect-src 'self'")

SWAGGER_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>vit-service API</title>
  <link rel="stylesheet" href="./static_content/swagger-ui.css">
  <link rel="icon" type="image/png" href="./static_content/favicon-light-32x32.png">
</head>
<body>
  <p style="font-family: sans-serif; margin: 8px 20px"><a href="./ui">Web page</a> &middot;
     <a href="./docs.json">OpenAPI spec (JSON)</a></p>
  <div id="swagger-ui"></div>
  <script src="./static_content/swagger-ui-bundle.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "./docs.json", dom_id: "#swagger-ui", deepLinking: true,
      validatorUrl: null,  // the default asks validator.swagger.io for a badge
      presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
    });
  </script>
</body>
</html>
"""


def ui_page() -> Response:
    return HTMLResponse(_ui_html(), headers={"content-security-policy": CSP, "cache-control": "no-cache"})


def docs_page() -> Response:
    return HTMLResponse(SWAGGER_PAGE, headers={"content-security-policy": CSP})


def docs_json(service: Any) -> Response:
    """BentoML's OpenAPI spec of `service` with our own info. BentoML documents the typed APIs and
    the GET routes of the mounted FastAPI app, but a path with both (/model_info) keeps only the
    GET: its POST (BentoML's client, `client.model_info()`, POSTs) is put back."""
    spec = service.openapi_spec.asdict()
    spec["info"] = {"title": TITLE, "description": DESCRIPTION, "version": vit_service.__version__}
    spec.pop("servers", None)  # BentoML's info has version "None" and its team as the contact
    for path, operations in api_paths(service).items():
        spec["paths"][path] = {**operations, **spec["paths"].get(path, {})}
    return JSONResponse(spec)


@functools.cache
def _ui_html() -> str:
    return UI_FILE.read_text(encoding="utf-8")
