"""The web page at ``/``: a person drops a photo and sees the answer.

Why plain files in the package (``ageray/serving/static``): no build step, nothing fetched
from the internet at run time (a Content-Security-Policy of ``'self'`` only), and a wheel
install ships them (``pyproject.toml`` package-data). The page calls the same
``POST /v1/predict?distribution=true&faces=all`` as any client, so it shows exactly the JSON
answer: a box on every face with its age beside it (placed in percent of the original image,
so the boxes follow the displayed size without redrawing), the list of faces (age, 90%
interval, the head that answered, the detector's score, gender and race when the model has
them), one face's details with its age distribution (the largest first; a click on a box or
a line picks another), the answer's ``reason`` when the photo has no face, and the model
version. A ``faces=largest`` answer (one flat face) is shown as a list of one.

The app's route prefix is only known per request (``root_path``), so ``index.html`` is
rendered with it: asset and API URLs are absolute under the prefix and work at ``/`` and at
``/age/`` alike. Static files are a fixed list: a name outside it is a 404, never a path.
"""

from __future__ import annotations

import html
import json
from functools import cache
from importlib import resources

from ageray.serving.errors import ServeError

__all__ = ["PAGE_HEADERS", "STATIC_FILES", "render_index", "static_file"]

#: name -> content type; nothing else under static/ is served
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: the page loads only from this origin; images are local blobs; no inline script
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; media-src 'self' blob:; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("ageray.serving").joinpath("static", name).read_bytes()


def render_index(
    root_path: str = "",
    *,
    genders: tuple[str, ...] | None = None,
    races: tuple[str, ...] | None = None,
) -> str:
    """``index.html`` for an app mounted at ``root_path`` (``""`` or ``"/age"``), with the
    class names of the multi-task labels (UTKFace's convention by default)."""
    if genders is None or races is None:
        from ageray.data.labels import GENDERS, RACES

        genders = GENDERS if genders is None else genders
        races = RACES if races is None else races
    root = root_path.rstrip("/")
    page = _read("index.html").decode("utf-8")
    values = {
        "{{ROOT}}": html.escape(root, quote=True),
        "{{GENDERS}}": html.escape(json.dumps(list(genders)), quote=True),
        "{{RACES}}": html.escape(json.dumps(list(races)), quote=True),
    }
    for key, value in values.items():
        page = page.replace(key, value)
    return page


def static_file(name: str) -> tuple[bytes, str]:
    """(bytes, content type) of one of :data:`STATIC_FILES`; anything else is a 404."""
    ctype = STATIC_FILES.get(name)
    if ctype is None:
        raise ServeError.http(404, f"no static file {name!r}; the page is at /")
    return _read(name), ctype
