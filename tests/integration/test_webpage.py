"""The web page in a real headless browser (Debian's chromium + chromium-driver, selenium)
against the real Serve app: upload a real face and read the age the page shows (it must be
the endpoint's answer for those bytes), a photo of three real faces shows three boxes, each
with that face's age, over the faces the endpoint found, a photo of a wall shows the no-face
message, a bad file shows the server's own error message, a phone-sized window needs no
sideways scrolling, and with auth on the token field is what makes it work.

CI installs chromium and chromium-driver itself (.ci/run); where they are absent the test
skips and says how to get them. The real face comes from ../shared/data/utkface-dev.tar
(read at run time, never copied into the repository); a synthetic face when it is absent.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import UTKFACE_TAR
from datagen import make_tiny_model
from services import free_port

pytestmark = pytest.mark.integration

TOKEN_ENV = "AGERAY_PAGE_TEST_TOKEN"
TOKEN = "page-test-token"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


def _browser_paths() -> tuple[str, str]:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip(
            "browser test: Debian's chromium and chromium-driver are not installed "
            "(apt-get install -y chromium chromium-driver; .ci/run does it in CI)"
        )
    return chromium, driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    webdriver = pytest.importorskip("selenium.webdriver", reason="pip install selenium")
    from selenium.webdriver.chrome.service import Service

    chromium, driver = _browser_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in CHROME_FLAGS:
        opts.add_argument(flag)
    opts.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    opts.add_argument("--window-size=412,915")  # a phone screen (CSS pixels)
    b = webdriver.Chrome(service=Service(executable_path=driver), options=opts)
    b.set_page_load_timeout(60)
    yield b
    b.quit()


@dataclass
class Site:
    base: str

    def url(self, prefix: str, path: str = "/") -> str:
        return f"{self.base}{prefix}{path}"


@pytest.fixture(scope="module")
def site(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Two apps on one tiny model folder: /open (no auth) and /locked (a bearer token)."""
    from ray import serve

    from serve.app import build_app

    # trained on aligned faces: the app detects every face of a photo, as for a real model
    folder = tmp_path_factory.mktemp("page-model") / "tiny"
    model = make_tiny_model(folder, seed=0, meta={"seed": 0, "align": True})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
    common = {"device": "cpu", "torch_threads": 1, "warmup_batch_sizes": [1]}
    for name, prefix, settings, env in (
        ("page-open", "/open", {"auth_token_env": "AGERAY_NO_TOKEN_HERE"}, {}),
        (
            "page-locked",
            "/locked",
            {"auth_token_env": TOKEN_ENV, "require_auth": True},
            {TOKEN_ENV: TOKEN},
        ),
    ):
        serve.run(
            build_app(
                str(model),
                settings={**common, **settings},
                num_replicas=1,
                ray_actor_options={
                    "num_cpus": 0.25,
                    "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1", **env}},
                },
            ),
            name=name,
            route_prefix=prefix,
        )
    yield Site(f"http://127.0.0.1:{port}")
    for name in ("page-open", "page-locked"):
        serve.delete(name)
    serve.shutdown()


@pytest.fixture(scope="module")
def real_face(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One UTKFace face as a file to upload, or a synthetic face without the tarball."""
    out = tmp_path_factory.mktemp("faces")
    if UTKFACE_TAR.is_file():
        with tarfile.open(UTKFACE_TAR) as tf:
            for member in tf:
                if member.isfile() and member.name.lower().endswith(".jpg"):
                    path = out / Path(member.name).name
                    path.write_bytes(tf.extractfile(member).read())
                    return path
    from ageray.data.synthetic import iter_synthetic

    path = out / "synthetic_face.jpg"
    path.write_bytes(next(iter(iter_synthetic(num_samples=1, image_size=128, seed=5))).image)
    return path


@dataclass
class Photo:
    path: Path
    sources: list[tuple[float, float, float, float]]  # each chip's rectangle in the photo


@pytest.fixture(scope="module")
def three_faces(tmp_path_factory: pytest.TempPathFactory) -> Photo:
    """A photo composed of three real UTKFace faces (a child, an adult, an elderly person:
    tests/faces.py) side by side, and where each chip lies in it."""
    from faces import compose_photo, utk_faces_by_band

    if not UTKFACE_TAR.is_file():
        pytest.skip(f"three real faces: {UTKFACE_TAR} is absent")
    bands = utk_faces_by_band(UTKFACE_TAR)
    data, sources = compose_photo([bands[b][0][2] for b in ("child", "adult", "elderly")])
    path = tmp_path_factory.mktemp("three") / "three_people.png"
    path.write_bytes(data)
    return Photo(path, sources)


@pytest.fixture(scope="module")
def wall(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A photo of a brick wall (tests/faces.py): no face in it."""
    from faces import wall_photo

    path = tmp_path_factory.mktemp("wall") / "garden_wall.jpg"
    path.write_bytes(wall_photo())
    return path


def _wait(browser: Any, script: str, timeout: float = 60.0) -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = browser.execute_script(script)
        if value:
            return value
        time.sleep(0.2)
    shot = browser.execute_script("return document.body.innerText")
    raise TimeoutError(f"page never satisfied {script!r}; it shows:\n{shot}")


def _upload(browser: Any, path: Path) -> None:
    from selenium.webdriver.common.by import By

    browser.execute_script(
        "document.getElementById('age').textContent = '–';"
        "document.getElementById('error').hidden = true;"
        "document.getElementById('noface').hidden = true;"
    )
    browser.find_element(By.ID, "file").send_keys(str(path))


RESULT = (
    "const e = document.getElementById('error');"
    "if (!e.hidden && e.textContent) return 'error: ' + e.textContent;"
    "const n = document.getElementById('noface');"
    "if (!n.hidden && n.textContent) return 'noface: ' + n.textContent;"
    "const a = document.getElementById('age').textContent;"
    "return a !== '–' ? 'age: ' + a : null;"
)

#: every box on the photo: its age tag and its place in CSS pixels relative to the <img>
BOXES = (
    "const img = document.getElementById('photo').getBoundingClientRect();"
    "return [...document.querySelectorAll('#boxes .box')].map((b) => {"
    "  const r = b.getBoundingClientRect();"
    "  return {tag: b.querySelector('.tag').textContent,"
    "          box: [r.left - img.left, r.top - img.top, r.right - img.left, r.bottom - img.top],"
    "          shown: [img.width, img.height]};"
    "});"
)


def _answer(base_url: str, path: Path, token: str | None = None) -> httpx.Response:
    """What the page sends: the file as multipart field ``file`` under its own name."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        base_url + "/v1/predict?distribution=true&faces=all",
        files={"file": (path.name, path.read_bytes(), _MEDIA.get(path.suffix, "image/jpeg"))},
        headers=headers,
        timeout=60,
    )


_MEDIA = {".png": "image/png", ".jpg": "image/jpeg"}


def _first_face(answer: dict[str, Any]) -> dict[str, Any]:
    """The face the page details first: the largest (a ``faces=all`` answer's first)."""
    return answer["faces"][0] if "faces" in answer else answer


def _same_message(text: str) -> str:
    """Messages may quote an object's repr; its address differs between two requests."""
    return re.sub(r"0x[0-9a-f]+", "0x?", text)


def test_upload_a_face_and_read_the_age(browser: Any, site: Site, real_face: Path) -> None:
    browser.get(site.url("/open", "/"))
    assert "ageray" in browser.title
    _upload(browser, real_face)
    shown = _wait(browser, RESULT)
    answer = _answer(site.url("/open", ""), real_face).json()
    want = _first_face(answer)
    assert shown == f"age: {want['age']:.1f}", (shown, want["age"])
    text = browser.execute_script("return document.getElementById('result').innerText")
    assert want["head"] in text
    if want.get("interval"):
        iv = want["interval"]
        assert f"90% interval: {iv['low']:.0f}–{iv['high']:.0f} years" in text
    # the distribution chart is drawn (canvas pixels are not all blank), the photo is shown
    inked = browser.execute_script(
        "const c = document.getElementById('chart');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n;"
    )
    assert inked > 100
    assert browser.execute_script("return document.getElementById('photo').naturalWidth") > 0
    want_model = answer["model"]
    model = browser.execute_script("return document.getElementById('model-version').textContent")
    assert want_model["name"] in model
    # usable on a phone: nothing wider than the 412 px window
    widths = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[1], widths


def test_drop_a_face_on_the_page(browser: Any, site: Site, real_face: Path) -> None:
    """Drag-and-drop: a drop event carrying the file (as the browser builds it from an OS
    drag), dispatched on the page outside the drop zone, is sent like a chosen file."""
    browser.get(site.url("/open", "/"))
    browser.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), (c) => c.charCodeAt(0));"
        "const dt = new DataTransfer();"
        "dt.items.add(new File([bytes], arguments[1], {type: 'image/jpeg'}));"
        "document.querySelector('header').dispatchEvent("
        "  new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));",
        base64.b64encode(real_face.read_bytes()).decode(),
        real_face.name,
    )
    shown = _wait(browser, RESULT)
    want = _first_face(_answer(site.url("/open", ""), real_face).json())
    assert shown == f"age: {want['age']:.1f}", shown


def test_three_faces_get_three_boxes_with_their_ages(
    browser: Any, site: Site, three_faces: Photo
) -> None:
    """The photo of a child, an adult and an elderly person: one box per face the endpoint
    found, where it found it (scaled to the shown image), each tagged with that face's age,
    and one line per face in the list."""
    from faces import covers

    answer = _answer(site.url("/open", ""), three_faces.path).json()
    faces = answer["faces"]
    assert len(faces) == 3, answer
    browser.get(site.url("/open", "/"))
    _upload(browser, three_faces.path)
    _wait(browser, RESULT)
    _wait(browser, "return document.getElementById('photo').complete")
    boxes = browser.execute_script(BOXES)
    assert [b["tag"] for b in boxes] == [f"{f['age']:.1f}" for f in faces], boxes
    width = answer["image"]["width"]
    for b, f in zip(boxes, faces):
        scale = b["shown"][0] / width
        assert b["box"] == pytest.approx([v * scale for v in f["box"]], abs=2.5), (b, f)
    items = browser.execute_script(
        "return [...document.querySelectorAll('#faces li')].map((li) => li.textContent)"
    )
    assert len(items) == 3
    for item, f in zip(items, faces):
        assert item.startswith(f"{f['age']:.1f} years") and f["head"] in item, item
        if f.get("score") is not None:
            assert f"score {f['score']:.3f}" in item
    # the boxes cover the three people, each face one source chip
    found = sorted(
        i for f in faces for i, src in enumerate(three_faces.sources) if covers(f["box"], src)
    )
    assert found == [0, 1, 2], (faces, three_faces.sources)
    # clicking a box details that face
    browser.execute_script("document.querySelectorAll('#boxes .box')[2].click()")
    assert browser.execute_script("return document.getElementById('age').textContent") == (
        f"{faces[2]['age']:.1f}"
    )
    widths = browser.execute_script(
        "return [document.documentElement.scrollWidth, window.innerWidth]"
    )
    assert widths[0] <= widths[1], widths
    shot = os.environ.get("AGERAY_PAGE_SCREENSHOT")
    if shot:  # a person looks at it; never committed
        browser.execute_script("document.getElementById('result').scrollIntoView()")
        browser.save_screenshot(shot)


def test_a_photo_of_a_wall_says_no_face(browser: Any, site: Site, wall: Path) -> None:
    answer = _answer(site.url("/open", ""), wall).json()
    assert answer["faces"] == [] and answer["reason"], answer
    browser.get(site.url("/open", "/"))
    _upload(browser, wall)
    shown = _wait(browser, RESULT)
    assert shown.startswith("noface: No face found in garden_wall.jpg"), shown
    assert answer["reason"] in shown
    assert browser.execute_script("return document.querySelectorAll('#boxes .box').length") == 0
    assert browser.execute_script("return document.getElementById('picked').hidden") is True


def test_a_bad_file_shows_the_servers_message(
    browser: Any, site: Site, tmp_path: Path, real_face: Path
) -> None:
    bad = tmp_path / "holiday.jpg"
    bad.write_bytes(b"this is a text file, not a JPEG\n" * 4)
    server = _answer(site.url("/open", ""), bad)
    assert server.status_code == 400
    message = server.json()["error"]["message"]
    browser.get(site.url("/open", "/"))
    _upload(browser, bad)
    shown = _wait(browser, RESULT)
    assert shown.startswith("error: HTTP 400") and "holiday.jpg" in shown, shown
    assert _same_message(message) in _same_message(shown), (message, shown)
    # and the page recovers: the next good photo is answered
    _upload(browser, real_face)
    assert _wait(browser, RESULT).startswith("age: ")


def test_with_auth_the_token_field_is_what_makes_it_work(
    browser: Any, site: Site, real_face: Path
) -> None:
    from selenium.webdriver.common.by import By

    browser.get(site.url("/locked", "/"))
    browser.execute_script("window.localStorage.clear()")
    browser.get(site.url("/locked", "/"))
    _upload(browser, real_face)
    shown = _wait(browser, RESULT)
    assert shown.startswith("error: This service needs an access token"), shown
    assert browser.execute_script("return document.getElementById('auth').open") is True
    token = browser.find_element(By.ID, "token")
    token.send_keys(TOKEN)
    browser.execute_script(
        "arguments[0].dispatchEvent(new Event('change', {bubbles: true}))", token
    )
    _upload(browser, real_face)
    shown = _wait(browser, RESULT)
    want = _first_face(_answer(site.url("/locked", ""), real_face, TOKEN).json())
    assert shown == f"age: {want['age']:.1f}"
    # the token is remembered by this browser for the next visit
    browser.get(site.url("/locked", "/"))
    assert browser.find_element(By.ID, "token").get_attribute("value") == TOKEN


def test_page_and_assets_are_served_under_the_prefix(site: Site) -> None:
    page = httpx.get(site.url("/open", "/"))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    assert 'src="/open/static/app.js"' in page.text
    js = httpx.get(site.url("/open", "/static/app.js"))
    assert js.status_code == 200 and "javascript" in js.headers["content-type"]
    missing = httpx.get(site.url("/open", "/static/../serve/app.py"))
    assert missing.status_code == 404
    assert httpx.get(site.url("/locked", "/")).status_code == 200  # the page itself is open
    assert httpx.get(site.url("/locked", "/v1/model")).status_code == 401
