"""X/Y/Z plots over HTTP (/api/v1/grids): planned before anything is paid, every cell queued and paid in one
transaction, followed over SSE, drawn by the CLI's grid writer (so `spellbook reproduce` runs a downloaded grid),
owner-only, cancellable with refunds, and kept in the store across a restart."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from clirun import run_cli
from spellbook.provenance import read_grid
from spellbook.settings import Settings

# The shipped shapes model at 2 steps: 32x32 images, each cell costs 1 credit.
BASE = {"prompt": "a red circle", "model": "shapes", "steps": 2}
GRID = {"request": BASE, "x": "seed=1,2", "y": "cfg=3,7"}


def wait_grid(client, grid_id, headers=None) -> tuple[dict, list[str]]:
    """Follow the grid's SSE stream to its end: (the final event's grid, every event's name)."""
    names, final = [], None
    with client.stream("GET", f"/api/v1/grids/{grid_id}/events", headers=headers) as stream:
        name = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
                names.append(name)
            elif line.startswith("data: ") and name in ("done", "failed", "cancelled"):
                final = json.loads(line.removeprefix("data: "))
    assert final is not None, names
    return final, names


@pytest.fixture
def users(home):
    """alice and bob (20 credits each), an admin, and their Authorization headers."""
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    headers = {}
    for name in ("alice", "bob", "root"):
        accounts.add_user(name, admin=name == "root")
        accounts.grant(name, 20)
        headers[name] = {"authorization": f"Bearer {accounts.create_token(name)}"}
    return accounts, headers


def nothing_paid_or_queued(client, accounts, headers, name="alice", balance=20):
    assert accounts.user(name).balance == balance
    assert [row["reason"] for row in accounts.ledger(name)] == ["grant"]
    assert client.get("/api/v1/jobs", headers=headers[name]).json() == []
    assert client.get("/api/v1/grids", headers=headers[name]).json() == []


def test_a_2x2_grid_runs_and_its_png_lists_every_cell_and_reproduces(make_client, home, tmp_path, capsys, monkeypatch):
    # Batching off: each cell runs alone, so the CLI's re-run below gives the same pixels bit for bit.
    client, _ = make_client(batching=False)
    response = client.post("/api/v1/grids", json=GRID)
    assert response.status_code == 202, response.text
    grid = response.json()
    assert grid["state"] in ("queued", "running") and grid["total"] == 4 and grid["images"] == []
    assert grid["axes"]["x"] == {"name": "seed", "field": "seed", "values": ["1", "2"]}
    assert grid["axes"]["z"] is None and grid["cost"] == 4
    final, events = wait_grid(client, grid["id"])
    assert events[-1] == "done" and set(events[:-1]) == {"progress"}
    assert final["state"] == "done" and final["progress"] == 1 and final["finished"] == 4
    assert final["images"] == [f"/api/v1/grids/{grid['id']}/images/0"]
    # x fastest: (seed 1, cfg 3), (seed 2, cfg 3), (seed 1, cfg 7), (seed 2, cfg 7); each cell a job of its own
    assert [(c["x"], c["y"], c["z"]) for c in final["cells"]] == [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)]
    for cell in final["cells"]:
        job = client.get(f"/api/v1/jobs/{cell['job']}").json()
        assert job["state"] == "done" and cell["image"] == f"/api/v1/jobs/{job['id']}/images/0"
        assert (job["recipe"]["seed"], job["recipe"]["guidance"]) == ([1, 2][cell["x"]], [3.0, 7.0][cell["y"]])
        assert (job["recipe"]["prompt"], job["recipe"]["steps"]) == ("a red circle", 2) and cell["recipe"] == job[
            "recipe"
        ]
    # The grid PNG: 32 px cells drawn at 128 px, column labels above, row labels on the left
    png = client.get(final["images"][0])
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    picture = Image.open(io.BytesIO(png.content))
    assert picture.height == 24 + 2 * 128 and 2 * 128 + 40 < picture.width < 2 * 128 + 120
    downloaded = tmp_path / "grid.png"
    downloaded.write_bytes(png.content)
    chunk = read_grid(downloaded)
    assert chunk["axes"]["y"]["values"] == ["3", "7"] and len(chunk["cells"]) == 4
    assert [c["recipe"] for c in chunk["cells"]] == [c["recipe"] for c in final["cells"]]
    assert client.get(final["images"][0]).content == png.content  # drawn once, kept
    assert (home / "grids" / f"{grid['id']}-0.png").is_file()
    assert client.get(f"/api/v1/grids/{grid['id']}/images/1").status_code == 404  # no z axis: one picture
    # `spellbook reproduce` on the downloaded grid runs every cell again (alone too): the same picture
    monkeypatch.setenv("SPELLBOOK_BATCHING", "0")
    code, stdout, err = run_cli(["reproduce", downloaded, "--out", tmp_path / "again", "--json"], capsys, monkeypatch)
    assert code == 0, err
    again = json.loads(stdout)
    assert [c["recipe"]["seed"] for c in again["cells"]] == [1, 2, 1, 2]
    assert np.array_equal(np.asarray(Image.open(again["grids"][0])), np.asarray(picture))


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"x": "steps=abc"}, "x", "'abc' is not a number"),
        ({"y": "colour=red,blue"}, "y", "unknown field 'colour'"),
        ({"x": "seed=1-3", "y": "steps=1-2"}, "grid", "6 cells"),  # SPELLBOOK_MAX_GRID_CELLS=4 below
        ({"x": "sampler=DDIM,Bogus"}, "x", "cell sampler=Bogus"),
        ({"y": None, "z": "size=32x32,36x36"}, "z", "cell seed=1, size=36x36: "),
        ({"x": "steps=2,9"}, "x", "steps"),  # SPELLBOOK_MAX_STEPS=8 below
        ({"request": {**BASE, "sampler": "Eular a"}}, "request.sampler", "cell seed=1, cfg=3"),
        ({"request": {**BASE, "batch_size": 2}}, "request.batch_size", "one image per cell"),
        ({"request": {**BASE, "colour": "red"}}, "request.colour", "colour"),
        ({"request": {**BASE, "model": "../shapes"}}, "request.model", ""),
        ({"request": {**BASE, "kind": "img2img", "init_image": "bm90IGFuIGltYWdl"}}, "request.init_image", ""),
        ({"x": None, "y": None}, "x", "at least one axis"),
        ({"w": "seed=1"}, "w", ""),
    ],
)
def test_a_bad_grid_is_a_400_naming_the_field_and_nothing_is_queued_or_paid(make_client, users, change, field, words):
    accounts, headers = users
    client, _ = make_client(start_worker=False, auth="on", max_grid_cells=4, max_steps=8)
    response = client.post("/api/v1/grids", json={**GRID, **change}, headers=headers["alice"])
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field and words in error["message"], error
    nothing_paid_or_queued(client, accounts, headers)


def test_a_grid_the_balance_cannot_pay_is_refused_whole(make_client, users):
    """5 credits, a 6-cell grid: 402 and nothing queued or debited (not five jobs and a refusal at the sixth)."""
    accounts, headers = users
    accounts.grant("alice", -15)
    client, _ = make_client(start_worker=False, auth="on")
    six = {**GRID, "x": "seed=1-3"}
    response = client.post("/api/v1/grids", json=six, headers=headers["alice"])
    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert error["field"] == "credits" and "6 cells" in error["message"] and "6 credits" in error["message"]
    assert accounts.user("alice").balance == 5 and client.get("/api/v1/jobs", headers=headers["alice"]).json() == []
    assert [row["reason"] for row in accounts.ledger("alice")] == ["adjust", "grant"]
    accounts.grant("alice", 1)
    paid = client.post("/api/v1/grids", json=six, headers=headers["alice"])
    assert paid.status_code == 202 and accounts.user("alice").balance == 0
    assert [row["reason"] for row in accounts.ledger("alice", limit=6)] == ["debit"] * 6
    assert len(client.get("/api/v1/jobs", headers=headers["alice"]).json()) == 6


def test_a_grid_is_its_owners_and_an_admins(make_client, users):
    _, headers = users
    client, _ = make_client(start_worker=False, auth="on")
    grid = client.post("/api/v1/grids", json=GRID, headers=headers["alice"]).json()
    for method, path in (
        ("GET", ""),
        ("GET", "/events"),
        ("GET", "/images/0"),
        ("POST", "/cancel"),
    ):
        response = client.request(method, f"/api/v1/grids/{grid['id']}{path}", headers=headers["bob"])
        assert response.status_code == 404 and response.json()["error"]["field"] == "grid_id", (path, response.text)
    assert client.get("/api/v1/grids", headers=headers["bob"]).json() == []
    assert [g["id"] for g in client.get("/api/v1/grids", headers=headers["alice"]).json()] == [grid["id"]]
    assert client.get(f"/api/v1/grids/{grid['id']}", headers=headers["root"]).json()["id"] == grid["id"]
    assert client.get("/api/v1/grids/nope", headers=headers["alice"]).status_code == 404


def test_cancel_ends_the_unfinished_cells_and_refunds_them(make_client, users):
    accounts, headers = users
    client, services = make_client(start_worker=False, auth="on")
    grid = client.post("/api/v1/grids", json=GRID, headers=headers["alice"]).json()
    assert accounts.user("alice").balance == 16
    # No picture while cells are queued: 409; a Z value the grid does not have: 404
    early = client.get(f"/api/v1/grids/{grid['id']}/images/0", headers=headers["alice"])
    assert (
        early.status_code == 409
        and early.json()["error"]["field"] == "grid_id"
        and "0 of 4" in early.json()["error"]["message"]
    )
    assert client.get(f"/api/v1/grids/{grid['id']}/images/1", headers=headers["alice"]).status_code == 404
    # One cell finishes (as a worker would record it), one is running, two are queued
    first, second = (cell["job"] for cell in grid["cells"][:2])
    services.db.execute("UPDATE jobs SET state = 'running' WHERE id IN (?, ?)", (first, second))
    services.queue.complete(first, {"images": []})
    running = client.get(f"/api/v1/grids/{grid['id']}", headers=headers["alice"]).json()
    assert running["state"] == "running" and running["finished"] == 1 and running["progress"] == 0.25
    cancelled = client.post(f"/api/v1/grids/{grid['id']}/cancel", headers=headers["alice"])
    assert cancelled.status_code == 200, cancelled.text
    view = cancelled.json()
    assert [c["state"] for c in view["cells"]] == ["done", "cancelled", "cancelled", "cancelled"]
    assert view["state"] == "cancelled" and view["images"] == []
    assert accounts.user("alice").balance == 19  # the done cell stays paid
    assert [row["reason"] for row in accounts.ledger("alice", limit=3)] == ["refund"] * 3
    again = client.post(f"/api/v1/grids/{grid['id']}/cancel", headers=headers["alice"])
    assert again.status_code == 409 and accounts.user("alice").balance == 19
    final, events = wait_grid(client, grid["id"], headers=headers["alice"])
    assert events == ["cancelled"] and final["state"] == "cancelled"


def test_a_failed_cell_fails_the_grid_once_the_other_cells_have_ended(make_client, users):
    accounts, headers = users
    client, services = make_client(start_worker=False, auth="on")
    grid = client.post("/api/v1/grids", json=GRID, headers=headers["alice"]).json()
    jobs = [cell["job"] for cell in grid["cells"]]
    services.queue.fail(jobs[0], {"code": "generation_failed", "message": "flat colour", "field": None})
    for job_id in jobs[1:3]:
        services.queue.complete(job_id, {"images": []})
    view = client.get(f"/api/v1/grids/{grid['id']}", headers=headers["alice"]).json()
    assert view["state"] == "running"  # one cell has not ended yet
    assert view["cells"][0]["state"] == "failed" and view["cells"][0]["error"]["message"] == "flat colour"
    services.queue.complete(jobs[3], {"images": []})
    view = client.get(f"/api/v1/grids/{grid['id']}", headers=headers["alice"]).json()
    assert view["state"] == "failed" and view["finished"] == 4 and view["images"] == []
    assert client.get(f"/api/v1/grids/{grid['id']}/images/0", headers=headers["alice"]).status_code == 409
    assert accounts.user("alice").balance == 17  # the failed cell was refunded, as a failed job is


def test_an_idempotency_key_gives_a_retry_the_grid_it_paid_for(make_client, users):
    accounts, headers = users
    client, _ = make_client(start_worker=False, auth="on")
    alice = {**headers["alice"], "Idempotency-Key": "grid-1"}
    first = client.post("/api/v1/grids", json=GRID, headers=alice).json()
    again = client.post("/api/v1/grids", json=GRID, headers=alice)
    assert again.status_code == 202 and again.json()["id"] == first["id"] and accounts.user("alice").balance == 16
    other = client.post("/api/v1/grids", json={**GRID, "x": "seed=3,4"}, headers=alice)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    assert len(client.get("/api/v1/jobs", headers=headers["alice"]).json()) == 4


def test_a_grid_survives_a_restart(make_client, home):
    """Queued by a server that stops; the next server on the same home runs its cells and draws it."""
    before, _ = make_client(start_worker=False)
    grid = before.post("/api/v1/grids", json={"request": BASE, "x": "prompt_sr=red,blue", "z": "seed=4,5"}).json()
    after, _ = make_client()
    final, _ = wait_grid(after, grid["id"])
    assert final["state"] == "done" and [c["job"] for c in final["cells"]] == [c["job"] for c in grid["cells"]]
    assert [c["recipe"]["prompt"] for c in final["cells"]] == ["a red circle", "a blue circle"] * 2
    assert final["images"] == [f"/api/v1/grids/{grid['id']}/images/{z}" for z in (0, 1)]
    second = after.get(final["images"][1])
    assert second.status_code == 200
    picture = Image.open(io.BytesIO(second.content))
    assert picture.height == 24 + 24 + 128  # the z title, the column labels, one row
    chunk = json.loads(picture.text["spellbook-grid"])
    assert chunk["z"] == 1 and [c["recipe"]["seed"] for c in chunk["cells"]] == [5, 5]


def test_the_index_and_the_schema_list_the_grids(make_client):
    client, _ = make_client(start_worker=False)
    index = client.get("/api/v1").json()
    assert index["resources"]["grids"] == "/api/v1/grids"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/grids", "/api/v1/grids/{grid_id}", "/api/v1/grids/{grid_id}/images/{z}"} <= set(paths)
    body = paths["/api/v1/grids"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/GridRequest")
    png = paths["/api/v1/grids/{grid_id}/images/{z}"]["get"]["responses"]["200"]["content"]
    assert list(png) == ["image/png"]
