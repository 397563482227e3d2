"""The Create page's Hires fix box in a real browser (Debian's chromium, Playwright, a real server on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from webtools import checked_page, launched_browser, needs_chromium, serve

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
sync_api.expect.set_options(timeout=60_000)  # a first generation loads the model
expect = sync_api.expect


@pytest.fixture
def page():
    with launched_browser() as browser, checked_page(browser) as page:
        yield page


def test_the_hires_box_draws_a_larger_image_remixes_and_shows_its_errors_beside_it(home, studio, page, tmp_path):
    with serve("tiny") as base:
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_value("tiny")
        expect(page.locator("#hires_scale")).to_be_hidden()  # folded away until asked for
        page.click("#hires summary")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "2")
        page.fill("#hires_scale", "2")
        page.fill("#hires_steps", "1")
        page.select_option("#hires_upscaler", "Lanczos")
        page.press("#prompt", "Control+Enter")
        result = page.locator(".result").first
        expect(result.locator('dd[data-field="hires"]')).to_have_text("32×32 (Lanczos, denoise 0.7, 1 step)")
        page.wait_for_function("(() => { const i = document.querySelector('.result img'); "
                               "return i && i.complete && i.naturalWidth === 32; })()")  # fmt: skip
        # A remix brings the pass back into the box (after it was switched off).
        page.fill("#hires_scale", "")
        expect(result.locator('button[data-action="remix"]')).to_have_count(1)  # once the gallery filed it
        result.locator('button[data-action="remix"]').click()
        expect(page.locator("#hires_scale")).to_have_value("2")
        expect(page.locator("#hires_upscaler")).to_have_value("Lanczos")
        shots = Path(os.environ.get("SPELLBOOK_SCREENSHOTS") or tmp_path)
        page.screenshot(path=shots / "ui-hires.png", full_page=True)
        # A size the server refuses: the message sits beside "Upscale by", nothing is queued.
        page.fill("#width", "512")
        page.fill("#height", "512")
        page.fill("#hires_scale", "8")
        page.click("#generate")
        expect(page.locator('[data-error-for="hires_scale"]')).to_contain_text("the limit is")
        expect(page.locator("#hires_scale")).to_have_attribute("aria-invalid", "true")
        # In img2img the box is not offered (the hires fix is a txt2img pass).
        page.click('.modes a[data-mode="img2img"]')
        expect(page.locator("#hires")).to_be_hidden()
