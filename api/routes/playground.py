"""The web playground: static HTML, CSS and JS (api/playground/) on the public API, served at `/`.

No build step and no server-side state: the page keeps the API key in the browser and calls /v1/... with it.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

FOLDER = Path(__file__).resolve().parent.parent / "playground"

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    """The playground page."""
    # no-cache: a deployment's new page is picked up at once (the files are small; ETags make it cheap)
    return FileResponse(FOLDER / "index.html", headers={"Cache-Control": "no-cache"})


def assets() -> StaticFiles:
    """Mounted at /playground: the page's CSS and JS."""
    return StaticFiles(directory=FOLDER)
