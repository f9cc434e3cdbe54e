"""The browser playground: ``GET /`` and its static files under ``/playground/``.

The page (service/static/) is plain HTML, CSS and one ES module: no build step and nothing
fetched from the internet, so it works offline and ships as package data. Every request it
makes is one a user could make with curl (the JSON API, /models and /metrics). The page
and its assets need no API key (the auth middleware leaves them open): with
``SOFTVQ_API_KEYS`` set, the page asks for a key and sends it as a bearer token.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parent / "static"
PREFIX = "/playground"  # assets: /playground/app.js, /playground/style.css


class _Revalidated(StaticFiles):
    """Static files that the browser revalidates (ETag) before each use: an upgraded server
    is seen at once, and an unchanged file costs a 304."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def mount_playground(app: FastAPI) -> None:
    """Serve the playground at ``/`` and its assets under ``/playground/``."""
    index = STATIC_DIR / "index.html"

    @app.get("/", include_in_schema=False)
    async def playground_index():
        # no-cache: the page revalidates (ETag), so an upgraded server is seen at once.
        return FileResponse(index, media_type="text/html", headers={"Cache-Control": "no-cache"})

    app.mount(PREFIX, _Revalidated(directory=STATIC_DIR), name="playground")
