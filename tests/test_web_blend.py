"""Blend in a real browser (Debian's chromium, Playwright, a real server on loopback): Blend on one result, then
on another, and the Create page draws the picture between them."""

from __future__ import annotations

import os
import re
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


def test_blend_pressed_on_two_results_draws_the_picture_between_them(home, page, tmp_path):
    with serve("shapes") as base:
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_value("shapes")
        page.fill("#prompt", "a red circle on the left")
        page.fill("#seed", "100")
        page.fill("#batch_size", "2")
        page.press("#prompt", "Control+Enter")
        results = page.locator(".result")
        expect(results.locator('button[data-action="blend"]')).to_have_count(2)  # once the gallery filed them
        results.nth(0).locator('button[data-action="blend"]').click()
        expect(page.locator("#status")).to_contain_text("picture A of a blend")
        results.nth(1).locator('button[data-action="blend"]').click()
        expect(page).to_have_url(re.compile(r"[?&]blend=\d+%2C\d+|[?&]blend=\d+,\d+"))
        expect(page.locator("#status")).to_contain_text("Done: 1 image")
        result = page.locator(".result").first
        expect(result.locator('dd[data-field="blend"]')).to_contain_text("t 0.5")
        expect(result.locator('button[data-action="blend"]')).to_have_count(1)  # once filed: blend it again
        expect(result.locator('button[data-action="remix"]')).to_have_count(0)  # a blend has no form to edit
        page.wait_for_function("(() => { const i = document.querySelector('.result img'); "
                               "return i && i.complete && i.naturalWidth === 32; })()")  # fmt: skip
        shots = Path(os.environ.get("SPELLBOOK_SCREENSHOTS") or tmp_path)
        page.screenshot(path=shots / "ui-blend.png", full_page=True)
        # a pair that cannot be blended says why, and nothing runs
        page.goto(base + "/?blend=1,99999")
        expect(page.locator("#status")).to_contain_text("Blend not queued")


def test_upscale_pressed_on_a_result_draws_it_twice_as_large(home, studio, page):
    with serve("tiny") as base:
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_value("tiny")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "2")
        page.press("#prompt", "Control+Enter")
        result = page.locator(".result").first
        expect(result.locator('button[data-action="upscale"]')).to_have_count(1)  # once the gallery filed it
        result.locator('button[data-action="upscale"]').click()
        expect(page).to_have_url(re.compile(r"[?&]upscale=\d+"))
        expect(page.locator("#status")).to_contain_text("Done: 1 image")
        page.wait_for_function("(() => { const i = document.querySelector('.result img'); "
                               "return i && i.complete && i.naturalWidth === 32; })()")  # fmt: skip
