"""The Concepts and Account pages in a real browser: Debian's chromium driven by Playwright, a real server on loopback.

Never runs `playwright install`: the browser is /usr/bin/chromium (scripts/system-deps.sh installs it).
Set SPELLBOOK_SCREENSHOTS=docs to refresh docs/ui-concepts.png and docs/ui-account.png.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from spellbook.concepts.formats import A1111, Concept, concept_bytes
from spellbook.settings import Settings
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database
from webtools import checked_page, launched_browser, needs_chromium, serve

pytestmark = needs_chromium
sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package")
sync_api.expect.set_options(timeout=60_000)  # a first training loads the model
expect = sync_api.expect


@pytest.fixture(autouse=True)
def one_thread():
    """The server trains in this process: with two torch threads on a busy 2-core machine a training step of the
    tiny model took 40x longer than with one (measured: 4 steps of batch 8 in 43 s against 0.7 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    with launched_browser() as browser:
        yield browser


@pytest.fixture
def page(browser):
    with checked_page(browser, accept_downloads=True) as page:
        yield page


@pytest.fixture
def screenshots(tmp_path) -> Path:
    return Path(os.environ.get("SPELLBOOK_SCREENSHOTS") or tmp_path)


def concept_file(name: str, n: int = 1, width: int = 32, model: str = "tiny") -> bytes:
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(0))
    return concept_bytes(Concept(name, vectors, metadata={"model": model}), A1111)


def file_input(name: str, data: bytes, mime: str = "application/octet-stream") -> dict:
    return {"name": name, "mimeType": mime, "buffer": data}


def squares(count: int = 3) -> list[dict]:
    """Small pictures of a bright square on a dark ground (the tiny model's native 16x16)."""
    files = []
    for i in range(count):
        pixels = np.full((16, 16, 3), 20, dtype=np.uint8)
        pixels[3 + i : 11 + i, 4:12] = (220, 40 + 60 * i, 40)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        files.append(file_input(f"{i}.png", buffer.getvalue(), "image/png"))
    return files


def start_training(page, name: str, pictures: list[dict], steps: int, init_word: str = "") -> None:
    page.set_input_files("#train-images", files=pictures)
    page.fill("#train-name", name)
    page.fill("#train-init", init_word)
    page.fill("#train-steps", str(steps))
    page.click("#train-start")


def test_password_sign_in_shows_balance_and_ledger_and_sign_out_ends_the_session(home, studio, page, screenshots):
    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("dora", password="correct horse battery")
    accounts.grant("dora", 25, note="starter credits")
    api_token = accounts.create_token("dora", "script")
    with serve("tiny", auth="on", lease_seconds=2) as base:  # short leases: a cancel is seen fast
        job = httpx.post(
            f"{base}/api/v1/jobs",
            json={"prompt": "a red circle", "steps": 2},
            headers={"authorization": f"Bearer {api_token}"},
            timeout=60,
        ).json()
        page.goto(base + "/account")
        expect(page.locator("#signin-panel")).to_be_visible()
        expect(page.locator("#status")).to_have_text("Not signed in.")
        page.fill("#username", "dora")
        page.fill("#password", "wrong password")
        page.click("#password-signin button[type=submit]")
        expect(page.locator('#password-signin [data-error-for=""]')).to_have_text("wrong user name or password")
        page.fill("#password", "correct horse battery")
        page.click("#password-signin button[type=submit]")
        expect(page.locator("#balance")).to_have_text(f"{25 - job['cost']} credits")
        expect(page.locator("#profile-name")).to_have_text("dora (user)")
        expect(page.locator("#who")).to_have_text(f"dora · {25 - job['cost']} credits")
        rows = page.locator("#ledger tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text(f"-{job['cost']}")
        expect(rows.nth(0)).to_contain_text(job["id"][:8])
        expect(rows.nth(1)).to_contain_text("+25")
        expect(rows.nth(1)).to_contain_text("starter credits")
        assert "spellbook_token" not in page.evaluate("document.cookie")  # HttpOnly: page scripts cannot read it
        expect(page.locator("#signin-panel")).to_be_hidden()
        page.screenshot(path=screenshots / "ui-account.png")

        page.click("#signout")
        expect(page.locator("#signin-panel")).to_be_visible()
        expect(page.locator("#who")).to_have_text("not signed in")
    session = [t for t in accounts.tokens("dora") if t["name"] == "web session"]
    assert len(session) == 1 and session[0]["revoked"] == 1


def test_concepts_page_uploads_lists_downloads_trains_and_deletes(home, studio, page):
    data = concept_file("charlie", n=2)
    with serve("tiny", lease_seconds=2) as base:
        page.goto(base + "/concepts")
        expect(page.locator("#status")).to_contain_text("No concepts yet")
        # Upload a concept file: it is listed with its shape and model.
        page.set_input_files("#upload-file", files=[file_input("charlie.safetensors", data)])
        page.click("#upload button[type=submit]")
        row = page.locator('tr[data-name="charlie"]')
        expect(row).to_contain_text("<charlie>")
        expect(row).to_contain_text("2 × 32")
        expect(row).to_contain_text("tiny")
        # Download it in both layouts.
        for link, key in (("A1111", "emb_params"), ("diffusers", "<charlie>")):
            with page.expect_download() as download_info:
                row.get_by_role("link", name=link).click()
            download = download_info.value
            tensors = load(Path(download.path()).read_bytes())
            assert list(tensors) == [key] and torch.equal(tensors[key], load(data)["emb_params"])
        assert download.suggested_filename == "charlie-diffusers.safetensors"
        # A pickle is refused, and the page says why beside the file field.
        page.set_input_files("#upload-file", files=[file_input("evil.pt", b"\x80\x04K\x01.")])
        page.click("#upload button[type=submit]")
        expect(page.locator('#upload [data-error-for="file"]')).to_contain_text("pickle")

        # Train: the progress bar follows the steps; Cancel stops it.
        start_training(page, "slow", squares(), steps=5000)
        expect(page.locator("#train-progress")).to_be_visible()
        expect(page.locator("#train-text")).to_have_text(re.compile(r"step [1-9]\d*/5000"))
        page.click("#train-cancel")
        expect(page.locator("#train-status")).to_have_text("Training cancelled (credits refunded).")
        expect(page.locator("#train-progress")).to_be_hidden()
        # A short one finishes and joins the list, with its sample grid.
        start_training(page, "blob", squares(), steps=4)
        expect(page.locator("#train-status")).to_contain_text("Trained <blob>: 4 steps")
        blob = page.locator('tr[data-name="blob"]')
        expect(blob).to_contain_text("1 × 32")
        expect(blob.locator("img.concept-sample")).to_be_visible()
        expect(page.locator('tr[data-name="slow"]')).to_have_count(0)

        # Delete takes a second click to confirm.
        remove = row.locator("button.remove")
        remove.click()
        expect(remove).to_have_text("Really delete?")
        remove.click()
        expect(row).to_have_count(0)
        expect(page.locator("#status")).to_have_text("Deleted <charlie>.")


def test_screenshot_of_the_concepts_page_with_the_shapes_model(home, page, screenshots, tmp_path):
    """A concept trained here from pictures of triangles, and one uploaded (SPELLBOOK_SCREENSHOTS=docs)."""
    from spellbook.toy import world

    rng = np.random.default_rng(0)
    colours, positions, backgrounds = list(world.COLOURS), list(world.POSITIONS), list(world.BACKGROUNDS)
    pictures = []
    for i in range(8):
        scene = world.Scene(colours[i % 6], "triangle", positions[i % 5], backgrounds[i % 3])
        buffer = io.BytesIO()
        Image.fromarray(world.render(scene, rng)).save(buffer, format="PNG")
        pictures.append(file_input(f"{i}.png", buffer.getvalue(), "image/png"))
    with serve("shapes", lease_seconds=2) as base:
        page.goto(base + "/concepts")
        page.set_input_files(
            "#upload-file", files=[file_input("sparkle.safetensors", concept_file("x", 2, 64, "shapes"))]
        )
        page.click("#upload button[type=submit]")
        expect(page.locator('tr[data-name="sparkle"]')).to_contain_text("2 × 64")
        start_training(page, "wedge", pictures, steps=10, init_word="triangle")
        expect(page.locator("#train-status")).to_contain_text("Trained <wedge>: 10 steps")
        page.wait_for_function("[...document.images].every(img => img.complete && img.naturalWidth > 0)")
        page.screenshot(path=screenshots / "ui-concepts.png")
    assert (screenshots / "ui-concepts.png").stat().st_size > 10_000
