"""The web page's server side (ageray.serving.page): rendered for any route prefix, assets
and API calls under that prefix, a fixed list of static files, nothing from elsewhere, and
the files shipped as package data. The browser test is tests/integration/test_webpage.py."""

from __future__ import annotations

import re
import tomllib
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest

from ageray.serving.errors import ServeError
from ageray.serving.page import PAGE_HEADERS, STATIC_FILES, render_index, static_file

ROOT = Path(__file__).resolve().parents[2]


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.body: dict[str, str | None] = {}
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.refs += [v for k, v in a.items() if k in ("src", "href") and v]
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "body":
            self.body = a
        self._in_script = tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        self._in_script = False


def parse(html: str) -> _Refs:
    p = _Refs()
    p.feed(html)
    return p


@pytest.mark.parametrize("root", ["", "/age", "/age/"])
def test_index_points_every_url_under_the_route_prefix(root: str) -> None:
    page = parse(render_index(root))
    prefix = root.rstrip("/")
    assert page.body["data-root"] == prefix
    assert f"{prefix}/static/app.js" in page.refs and f"{prefix}/static/style.css" in page.refs
    for ref in page.refs:  # nothing from another origin, no protocol-relative URLs
        assert ref.startswith(prefix + "/") and not ref.startswith("//"), ref
    assert page.inline_scripts == 0  # CSP script-src 'self' holds
    # what the JS and the browser test rely on
    assert {
        "file",
        "camera",
        "drop",
        "token",
        "age",
        "interval",
        "head",
        "error",
        "chart",
        "photo",
        "model-version",
        "gender",
        "race",
        "boxes",
        "faces",
        "noface",
        "picked",
    } <= page.ids


def test_index_escapes_what_it_inserts() -> None:
    html = render_index('/x"><script>alert(1)</script>', genders=('m"f',), races=("<b>",))
    assert "<script>alert" not in html
    page = parse(html)
    assert page.body["data-root"] == '/x"><script>alert(1)</script>'
    assert page.body["data-genders"] == '["m\\"f"]' and page.body["data-races"] == '["<b>"]'


def test_index_names_the_multitask_classes() -> None:
    body = parse(render_index("")).body
    assert body["data-genders"] == '["male", "female"]'
    assert '"white"' in (body["data-races"] or "")


def test_static_files_are_a_fixed_list() -> None:
    for name, ctype in STATIC_FILES.items():
        data, got = static_file(name)
        assert got == ctype and len(data) > 500
    for bad in ("index.html", "../page.py", "app.js/../../settings.py", "", "APP.JS"):
        with pytest.raises(ServeError) as err:
            static_file(bad)
        assert err.value.status == 404


def test_javascript_talks_only_to_its_own_service() -> None:
    js = static_file("app.js")[0].decode()
    urls = re.findall(r"https?://[^\s\"']+", js)
    assert urls == []
    assert 'ROOT + "/v1/predict?distribution=true&faces=all"' in js and 'ROOT + "/v1/model"' in js
    assert "Authorization" in js and "error.message" in js


def test_page_headers_allow_only_self() -> None:
    csp = PAGE_HEADERS["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    assert "unsafe-inline" not in csp and "http" not in csp


def test_static_files_are_package_data() -> None:
    """A wheel install must ship the page: the files are in the package and pyproject's
    package-data globs match each of them."""
    folder = resources.files("ageray.serving").joinpath("static")
    names = {p.name for p in folder.iterdir()}
    assert names >= {"index.html", *STATIC_FILES}
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-data"
    ]["ageray"]
    pkg = ROOT / "platform" / "ageray"
    shipped = {p.name for g in globs for p in pkg.glob(g)}
    assert names <= shipped, names - shipped
