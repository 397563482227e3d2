"""The web UI in a real browser: Debian's chromium driven by Playwright against a real server on loopback.

Never runs `playwright install`: the browser is /usr/bin/chromium (scripts/system-deps.sh installs it).
Set SPELLBOOK_SCREENSHOTS=docs to refresh the README's screenshots (docs/ui-create.png, docs/ui-gallery.png).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from spellbook.server.app import build_services, create_app
from spellbook.settings import Settings

CHROMIUM = Path("/usr/bin/chromium")
HTTP_TIMEOUT = 120  # the first job of a model loads it, slow on a busy machine
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (scripts/system-deps.sh installs it)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
sync_api.expect.set_options(timeout=60_000)  # a first generation loads the model


@contextmanager
def serve(default_model: str, **settings_overrides):
    """A real uvicorn server for the test home, on a free loopback port, in a thread; yields its base URL."""
    import uvicorn

    settings = Settings.from_env(**settings_overrides)
    services = build_services(settings)
    services.default_model = default_model
    app = create_app(settings, services=services)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    page = context.new_page()
    page.set_default_timeout(60_000)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"JavaScript errors on the page: {errors}"


def run_job(base: str, **request) -> dict:
    """Generate through the API (as another client would) and wait for the job to finish."""
    job = httpx.post(f"{base}/api/v1/jobs", json=request, timeout=HTTP_TIMEOUT).json()
    deadline = time.monotonic() + 120
    while job["state"] not in ("done", "failed", "cancelled"):
        assert time.monotonic() < deadline, f"job did not finish: {job}"
        time.sleep(0.1)
        job = httpx.get(f"{base}/api/v1/jobs/{job['id']}", timeout=HTTP_TIMEOUT).json()
    assert job["state"] == "done", job
    return job


def generate_on_page(page, prompt: str, **fields) -> None:
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"#{name}", str(value))
    page.press("#prompt", "Control+Enter")


def test_ctrl_enter_generates_an_image_shown_with_its_recipe(home, studio, page):
    with serve("tiny") as base:
        page.goto(base + "/")
        sync_api.expect(page.locator("#model")).to_have_value("tiny")
        assert page.locator("#sampler option", has_text="Euler a").count() == 1
        generate_on_page(page, "a red circle", steps=2, width=16, height=16, seed=1234, batch_size=2)
        results = page.locator(".result")
        sync_api.expect(results).to_have_count(2)
        sync_api.expect(results.nth(0).locator('dd[data-field="seed"]')).to_have_text("1234")
        sync_api.expect(results.nth(1).locator('dd[data-field="seed"]')).to_have_text("1235")
        sync_api.expect(results.nth(0).locator('dd[data-field="prompt"]')).to_have_text("a red circle")
        sync_api.expect(results.nth(0).locator('dd[data-field="steps"]')).to_have_text("2")
        assert results.nth(0).locator("img").evaluate("img => img.complete && img.naturalWidth") == 16
        download = results.nth(0).locator("a.download")
        assert download.get_attribute("download").endswith("-0.png")
        png = httpx.get(base + download.get_attribute("href"), timeout=HTTP_TIMEOUT)
        assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
        sync_api.expect(page.locator("#status")).to_contain_text("Done: 2 images")
        sync_api.expect(page.locator("#progress")).to_be_hidden()
        # dice makes the seed random again; "reuse last seed" brings back the last image's
        page.click("#dice")
        sync_api.expect(page.locator("#seed")).to_have_value("-1")
        page.click("#reuse")
        sync_api.expect(page.locator("#seed")).to_have_value("1234")


def test_a_running_job_shows_progress_and_can_be_cancelled(home, studio, page, tmp_path):
    with serve("tiny") as base:
        page.goto(base + "/")
        sync_api.expect(page.locator("#model")).to_have_value("tiny")
        # the most steps, a big size and batch: long enough to cancel while it runs
        generate_on_page(page, "a slow red circle", steps=150, width=256, height=256, batch_size=2)
        sync_api.expect(page.locator("#progress-text")).to_have_text(re.compile(r"running|step \d+/150"))
        sync_api.expect(page.locator("#progress")).to_be_visible()
        page.set_viewport_size({"width": 390, "height": 844})
        page.screenshot(path=tmp_path / "ui-create-phone.png", full_page=True)
        page.click("#cancel")
        sync_api.expect(page.locator("#status")).to_have_text("Cancelled.")
        sync_api.expect(page.locator("#cancel")).to_be_hidden()
        sync_api.expect(page.locator("#generate")).to_be_enabled()
        assert page.locator(".result").count() == 0


def test_api_errors_are_shown_beside_their_fields(home, studio, page):
    with serve("tiny") as base:
        page.goto(base + "/")
        sync_api.expect(page.locator("#model")).to_have_value("tiny")
        generate_on_page(page, "a blue square", width=500, height=500, steps=2)
        size_error = page.locator('[data-error-for="size"]')
        sync_api.expect(size_error).to_contain_text("500")
        sync_api.expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
        generate_on_page(page, "a blue square", width=16, height=16, steps=0)
        sync_api.expect(page.locator('[data-error-for="steps"]')).to_contain_text("steps")
        sync_api.expect(size_error).to_be_hidden()  # the earlier error is cleared on the next try
        assert page.locator(".result").count() == 0
        # usable at phone width: one column, nothing wider than the screen
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        prompt_box, output_box = page.locator("#create").bounding_box(), page.locator(".output").bounding_box()
        assert output_box["y"] >= prompt_box["y"] + prompt_box["height"]


def test_gallery_search_finds_a_generated_image_by_a_word_of_its_prompt(home, studio, page):
    with serve("tiny") as base:
        run_job(base, prompt="a lemon yellow square", steps=2, width=16, height=16, seed=7)
        run_job(base, prompt="a dark green triangle", steps=2, width=16, height=16, seed=8)
        page.goto(base + "/gallery")
        sync_api.expect(page.locator("#status")).to_contain_text("No public images")  # private until published
        page.fill("#q", "lemon")
        page.press("#q", "Enter")
        tiles = page.locator(".tile")
        sync_api.expect(tiles.first).to_have_attribute("title", "a lemon yellow square")
        tiles.first.click()
        detail = page.locator("#detail")
        sync_api.expect(detail).to_be_visible()
        sync_api.expect(detail.locator('dd[data-field="prompt"]')).to_have_text("a lemon yellow square")
        sync_api.expect(detail.locator('dd[data-field="seed"]')).to_have_text("7")
        page.keyboard.press("Escape")
        sync_api.expect(detail).to_be_hidden()


def test_screenshots_of_the_pages_with_the_shapes_model(home, studio, page, tmp_path):
    """Real images from the shapes model at its defaults, for the README (SPELLBOOK_SCREENSHOTS=docs)."""
    out = Path(os.environ.get("SPELLBOOK_SCREENSHOTS") or tmp_path)
    with serve("shapes") as base:
        for seed, prompt in enumerate(["a blue square", "a green triangle", "a yellow circle", "a red square"]):
            job = run_job(base, prompt=prompt, seed=seed)
            image_id = job["result"]["images"][0]["image_id"]
            httpx.post(
                f"{base}/api/v1/gallery/images/{image_id}/visibility",
                json={"visibility": "public"},
                timeout=HTTP_TIMEOUT,
            )
        page.goto(base + "/")
        sync_api.expect(page.locator("#model")).to_have_value("shapes")
        generate_on_page(page, "a red circle", seed=42, batch_size=2)
        sync_api.expect(page.locator(".result")).to_have_count(2)
        page.screenshot(path=out / "ui-create.png")
        page.goto(base + "/gallery")
        sync_api.expect(page.locator(".tile")).to_have_count(4)
        page.locator(".tile", has_text="a yellow circle").click()
        sync_api.expect(page.locator("#detail")).to_be_visible()
        page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")
        page.screenshot(path=out / "ui-gallery.png")
    assert (out / "ui-create.png").stat().st_size > 10_000


def test_with_auth_on_the_pages_load_and_a_token_signs_in(home, studio, page):
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("dora")
    accounts.grant("dora", 20)
    token = accounts.create_token("dora")
    with serve("tiny", auth="on") as base:
        page.goto(base + "/")
        sync_api.expect(page.locator("#who")).to_have_text("not signed in")
        sync_api.expect(page.locator('[data-error-for=""]')).to_be_visible()  # the models could not be listed
        page.fill("#token", token)
        page.click("#signin button")
        sync_api.expect(page.locator("#who")).to_have_text("dora · 20 credits")
        sync_api.expect(page.locator("#model")).to_have_value("tiny")
        generate_on_page(page, "a red circle", steps=2, width=16, height=16, seed=5)
        sync_api.expect(page.locator('.result dd[data-field="seed"]')).to_have_text("5")
        assert page.locator(".result img").evaluate("img => img.naturalWidth") == 16  # the cookie fetched it
