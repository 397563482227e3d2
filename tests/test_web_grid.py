"""The Create page's X/Y/Z plot panel in a real browser: Debian's chromium driven by Playwright, a real server on
loopback (never `playwright install`). Set SPELLBOOK_SCREENSHOTS=docs to refresh docs/ui-grid.png.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import httpx
import pytest
from PIL import Image

from webtools import checked_page, launched_browser, needs_chromium, serve

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
sync_api.expect.set_options(timeout=60_000)  # a first generation loads the model
expect = sync_api.expect

# Records, from the page itself, what each cell of the grid showed over time: a page that drew the grid only at
# the end (or never showed a cell's state while it waited) would not pass.
WATCH_CELLS = """() => {
  window.cellHistory = { placeholders: [], images: [] };
  new MutationObserver(() => {
    const cells = document.querySelectorAll("#grid-results .xyz-cell");
    if (!cells.length) return;
    const texts = [...document.querySelectorAll("#grid-results .xyz-placeholder")].map((p) => p.textContent);
    window.cellHistory.placeholders.push(...texts);
    const images = document.querySelectorAll("#grid-results .xyz-cell img").length;
    const seen = window.cellHistory.images;
    if (seen[seen.length - 1] !== images) seen.push(images);
  }).observe(document.getElementById("grid-results"), { subtree: true, childList: true });
}"""


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as browser:
        yield browser


@pytest.fixture
def page(browser):
    with checked_page(browser) as page:
        yield page


@pytest.fixture
def screenshots(tmp_path) -> Path:
    return Path(os.environ.get("SPELLBOOK_SCREENSHOTS") or tmp_path)


def set_axis(page, axis: str, field: str, values: str) -> None:
    page.select_option(f"#{axis}-field", field)
    page.fill(f"#{axis}-values", values)


def test_an_xyz_plot_fills_its_labelled_grid_cell_by_cell_and_links_the_grid_png(home, page, screenshots, tmp_path):
    with serve("shapes") as base:
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_value("shapes")
        page.fill("#prompt", "a red circle")
        page.fill("#steps", "10")
        page.click("#xyz summary")
        expect(page.locator("#y-values")).to_be_disabled()  # until Y has a field
        set_axis(page, "x", "seed", "1, 2")
        set_axis(page, "y", "cfg", "3, 7")
        page.evaluate(WATCH_CELLS)
        page.click("#grid-generate")
        grid = page.locator("#grid-results")
        expect(grid.locator(".xyz-cell")).to_have_count(4)
        expect(grid.locator('th[scope="col"]')).to_have_text(["seed: 1", "seed: 2"])
        expect(grid.locator('th[scope="row"]')).to_have_text(["cfg: 3", "cfg: 7"])
        expect(grid.locator(".xyz-cell img")).to_have_count(4)
        expect(page.locator("#status")).to_have_text("Done: a grid of 4 cells.")
        link = grid.locator("a.grid-png")
        expect(link).to_be_visible()
        page.wait_for_function(
            "[...document.querySelectorAll('.xyz-cell img')].every(img => img.complete && img.naturalWidth === 32)"
        )
        history = page.evaluate("window.cellHistory")
        assert {"queued", "running"} & set(history["placeholders"]), history  # each cell's state, while it waited
        assert (
            history["images"][0] < 4 and history["images"][-1] == 4 and history["images"] == sorted(history["images"])
        )
        # each cell's picture is its job's image, in the right place: (seed 2, cfg 7) is the bottom right
        corner = grid.locator('.xyz-cell[data-key="1,1,0"] img').get_attribute("src")
        job = httpx.get(base + corner.replace("/images/0", ""), timeout=60).json()
        assert (job["recipe"]["seed"], job["recipe"]["guidance"], job["recipe"]["steps"]) == (2, 7.0, 10)
        # the linked PNG is the labelled grid with every cell's recipe inside
        png = httpx.get(base + link.get_attribute("href"), timeout=60)
        assert png.headers["content-type"] == "image/png"
        picture = Image.open(io.BytesIO(png.content))
        cells = json.loads(picture.text["spellbook-grid"])["cells"]
        assert [(c["recipe"]["seed"], c["recipe"]["guidance"]) for c in cells] == [(1, 3), (2, 3), (1, 7), (2, 7)]
        expect(page.locator("#cancel")).to_be_hidden()
        expect(page.locator("#generate")).to_be_enabled()
        page.screenshot(path=screenshots / "ui-grid.png", full_page=True)
        # at phone width: one column, the grid scrolls inside its panel, nothing wider than the screen
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=tmp_path / "ui-grid-phone.png", full_page=True)
    assert (screenshots / "ui-grid.png").stat().st_size > 10_000


def test_a_bad_axis_value_is_shown_beside_its_axis_and_nothing_is_queued(home, studio, page):
    with serve("tiny") as base:
        page.goto(base + "/")
        expect(page.locator("#model")).to_have_value("tiny")
        page.fill("#prompt", "a blue square")
        page.click("#xyz summary")
        set_axis(page, "x", "steps", "2, abc")
        page.click("#grid-generate")
        expect(page.locator('[data-error-for="x"]')).to_contain_text("'abc' is not a number")
        expect(page.locator("#x-values")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#status")).to_have_text("Not queued: fix the field marked in red.")
        # too many cells (the server's SPELLBOOK_MAX_GRID_CELLS, 100): the grid's own slot; the X error is cleared
        set_axis(page, "x", "seed", "1-101")
        page.press("#x-values", "Enter")
        expect(page.locator('[data-error-for="grid"]')).to_contain_text("101 cells")
        expect(page.locator('[data-error-for="x"]')).to_be_hidden()
        # a cell the request's own setting breaks: shown beside that setting (the size boxes)
        set_axis(page, "x", "seed", "1, 2")
        page.fill("#width", "36")
        page.fill("#height", "36")
        page.click("#grid-generate")
        expect(page.locator('[data-error-for="size"]')).to_contain_text("cell seed=1")
        expect(page.locator("#width")).to_have_attribute("aria-invalid", "true")
        expect(page.locator("#grid-results")).to_be_hidden()
        assert httpx.get(f"{base}/api/v1/jobs", timeout=60).json() == []
        assert httpx.get(f"{base}/api/v1/grids", timeout=60).json() == []
