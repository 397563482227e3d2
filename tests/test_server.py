"""The HTTP API against the embedded worker: native jobs, SSE, errors, auth, caps, credits, A1111 clients."""

from __future__ import annotations

import base64
import io
import json
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

from jobwait import wait_done, wait_filed
from spellbook.errors import UserError
from spellbook.provenance import read_metadata
from spellbook.server.app import build_services
from spellbook.settings import Settings
from webtools import serve


def png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_a_job_runs_and_its_png_carries_the_recipe(make_client, home):
    client, _ = make_client()
    response = client.post("/api/v1/jobs", json={"prompt": "a red circle", "seed": 11, "batch_size": 2, "steps": 3})
    assert response.status_code == 202, response.text
    job = wait_done(client, response.json()["id"])
    assert job["state"] == "done" and len(job["images"]) == 2
    png = client.get(job["images"][1])
    assert png.headers["content-type"] == "image/png"
    path = home / job["result"]["images"][1]["path"]
    assert path.read_bytes() == png.content
    recipe = read_metadata(path).recipe
    assert (recipe.prompt, recipe.seed, recipe.batch_index, recipe.steps) == ("a red circle", 11, 1, 3)


def test_sse_streams_progress_then_done(make_client):
    client, _ = make_client()
    job = client.post("/api/v1/jobs", json={"prompt": "a blue square", "seed": 1, "steps": 8}).json()
    events = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events") as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                events.append(line.removeprefix("event: "))
    assert events[-1] == "done"
    assert set(events[:-1]) <= {"progress"}


@pytest.mark.parametrize(
    "body, field",
    [
        ({"prompt": "x", "sampler": "Eular a"}, "sampler"),
        ({"prompt": "x", "steps": "many"}, "steps"),
        ({"prompt": "x", "colour": "red"}, "colour"),
        ({"prompt": "x", "model": "../../etc/passwd"}, "model"),
        ({"prompt": "x", "width": 500, "height": 512}, "size"),
        ({"prompt": "x", "kind": "img2img"}, "init_image"),
        ({"prompt": "x", "kind": "img2img", "init_image": "bm90IGFuIGltYWdl"}, "init_image"),
        ({}, "prompt"),
    ],
)
def test_bad_requests_are_400_with_a_field(make_client, body, field):
    client, _ = make_client(start_worker=False)
    response = client.post("/api/v1/jobs", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field and error["message"] and error["code"] in ("invalid", "refused")


def huge_png_header(width: int, height: int) -> bytes:
    """A PNG that claims to be width x height: decoding it would take gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_caps_refuse_before_decoding(make_client):
    client, _ = make_client(start_worker=False, max_body_mb=1)
    big = client.post(
        "/api/v1/jobs", content=b"{" + b" " * (2 * 1024 * 1024) + b"}", headers={"content-type": "application/json"}
    )
    assert big.status_code == 413 and big.json()["error"]["field"] == "body"
    for width, height, shown in ((60_000, 60_000, "3600000000 pixels"), (5000, 5000, "5000x5000")):
        bomb = base64.b64encode(huge_png_header(width, height)).decode()
        response = client.post("/api/v1/jobs", json={"prompt": "x", "kind": "img2img", "init_image": bomb})
        assert response.status_code == 413 and shown in response.json()["error"]["message"]


def test_foreign_origin_post_is_refused(make_client):
    client, _ = make_client(start_worker=False)
    response = client.post("/api/v1/jobs", json={"prompt": "x"}, headers={"origin": "https://evil.example"})
    assert response.status_code == 403
    same = client.post("/api/v1/jobs", json={"prompt": "x"}, headers={"origin": "http://127.0.0.1"})
    assert same.status_code == 202


def test_public_bind_needs_an_admin_and_tokens(make_client, home):
    with pytest.raises(UserError, match="no admin user"):
        build_services(Settings.from_env(host="0.0.0.0"), start_worker=False)
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("root", admin=True)
    accounts.add_user("alice")
    accounts.add_user("bob")
    for name in ("alice", "bob"):
        accounts.grant(name, 50)
    alice = {"authorization": f"Bearer {accounts.create_token('alice')}"}
    bob = {"authorization": f"Bearer {accounts.create_token('bob')}"}
    client, _ = make_client(host="0.0.0.0")
    assert client.get("/api/v1/jobs").status_code == 401
    assert client.get("/api/v1/jobs", headers={"authorization": "Bearer sb_wrong"}).status_code == 401
    job = client.post("/api/v1/jobs", json={"prompt": "x", "steps": 2}, headers=alice).json()
    done = wait_done(client, job["id"], headers=alice)
    assert done["state"] == "done"
    # Bob can neither see Alice's job nor its image, nor cancel it: as if it did not exist.
    assert client.get(f"/api/v1/jobs/{job['id']}", headers=bob).status_code == 404
    assert client.get(f"/api/v1/jobs/{job['id']}/images/0", headers=bob).status_code == 404
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=bob).status_code == 404
    assert [j["id"] for j in client.get("/api/v1/jobs", headers=bob).json()] == []
    me = client.get("/api/v1/me", headers=alice).json()
    assert me["balance"] == 50 - job["cost"] and me["ledger"][0]["reason"] == "debit"


def test_credits_never_overdraw_under_concurrent_submits(make_client, home):
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("carol")
    accounts.grant("carol", 100)
    headers = {"authorization": f"Bearer {accounts.create_token('carol')}"}
    client, services = make_client(start_worker=False, auth="on", rate_limit=0)
    body = {"prompt": "x", "steps": 4, "width": 16, "height": 16}  # cost 1 each
    with ThreadPoolExecutor(16) as pool:
        codes = list(
            pool.map(lambda _: client.post("/api/v1/jobs", json=body, headers=headers).status_code, range(200))
        )
    assert codes.count(202) == 100 and codes.count(402) == 100
    assert accounts.user("carol").balance == 0
    # A failed job and a cancelled one are refunded, once each.
    jobs = services.queue.list(owner=accounts.user("carol").id, limit=500)
    leased = services.queue.lease("test-worker", max_batch=1)
    services.queue.fail(leased[0].id, {"code": "boom", "message": "test failure"})
    services.queue.fail(leased[0].id, {"code": "boom", "message": "again"})
    queued = next(j for j in jobs if j.id != leased[0].id)
    assert client.post(f"/api/v1/jobs/{queued.id}/cancel", headers=headers).json()["state"] == "cancelled"
    assert client.post(f"/api/v1/jobs/{queued.id}/cancel", headers=headers).status_code == 409
    assert accounts.user("carol").balance == 2
    ledger = accounts.ledger("carol", limit=500)
    assert sum(row["delta"] for row in ledger) == 2 and [r["reason"] for r in ledger[:2]] == ["refund", "refund"]


def test_queue_is_fair_and_batches_compatible_jobs(make_client):
    from spellbook.store.accounts import Accounts

    _, services = make_client(start_worker=False)
    accounts = Accounts(services.db)
    heavy, light = accounts.add_user("heavy"), accounts.add_user("light")
    accounts.grant("heavy", 1000)
    accounts.grant("light", 1000)
    recipe = services.studio.plan({"prompt": "x", "model": "tiny", "steps": 2})
    for _ in range(10):
        services.queue.submit(recipe, owner=heavy.id)
    services.queue.submit(recipe.with_(prompt="y"), owner=light.id)
    group = services.queue.lease("w", max_batch=4)
    owners = [job.owner for job in group]
    assert len(group) == 4 and light.id in owners  # the lone light job rides in the first batch
    other = services.queue.submit(recipe.with_(steps=3), owner=light.id)
    second = services.queue.lease("w", max_batch=8)
    # Light has fewer jobs running than heavy, so its job leads; nothing incompatible rides with it.
    assert [job.id for job in second] == [other.id]
    third = services.queue.lease("w", max_batch=8)
    assert len(third) == 7 and {job.owner for job in third} == {heavy.id}


def test_a_batched_group_matches_separate_runs(make_client, home):
    from spellbook.engine.pipeline import generate
    from spellbook.recipe import make_recipe

    _, services = make_client(start_worker=False)
    components = services.studio.components_for("tiny")
    defaults = components.recipe_defaults()
    recipes = [
        make_recipe({"prompt": p, "seed": s, "batch_size": b}, defaults)
        for p, s, b in (("a red circle", 1, 2), ("a very long prompt " * 30, 7, 1), ("a blue square", 9, 1))
    ]
    together = generate(components, recipes)
    for recipe, images in zip(recipes, together):
        [alone] = generate(components, recipe)
        assert images.shape == alone.shape
        assert abs(images - alone).max() < 1e-4


def test_webuiapi_client_works_unchanged(home, studio, tmp_path):
    import webuiapi

    with serve("tiny") as base:
        port = int(base.rsplit(":", 1)[1])
        api = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler a", steps=3)
        result = api.txt2img(prompt="a red circle", seed=42, width=16, height=16, batch_size=2)
        assert len(result.images) == 2 and result.info["all_seeds"] == [42, 43]
        assert "Seed: 43" in result.info["infotexts"][1]
        info = api.png_info(result.images[0])
        assert info.info.startswith("a red circle") and info.parameters["Seed"] == "42"
        result = api.img2img(
            images=[result.images[0]], prompt="a blue square", seed=3, denoising_strength=0.5, width=16, height=16
        )
        assert len(result.images) == 1 and result.info["denoising_strength"] == 0.5
        models = api.get_sd_models()
        assert {m["model_name"] for m in models} >= {"tiny", "shapes"}
        api.util_set_model("tiny")
        assert api.get_options()["sd_model_checkpoint"].startswith("tiny [")
        assert {s["name"] for s in api.get_samplers()} >= {"Euler a", "DPM++ 2M"}
        assert "progress" in api.get_progress()
        hires = api.txt2img(prompt="a red circle", seed=5, width=16, height=16, steps=2, enable_hr=True, hr_scale=2,
                            hr_upscaler=webuiapi.HiResUpscaler.LatentNearestExact, hr_second_pass_steps=1,
                            denoising_strength=0.5)  # fmt: skip
        assert hires.images[0].size == (32, 32)
        assert "Hires upscaler: Latent (nearest-exact)" in hires.info["infotexts"][0]
        assert "Latent (nearest-exact)" in {mode["name"] for mode in api.get_latent_upscale_modes()}


def test_finished_jobs_are_searchable_and_private_until_published(make_client, home):
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    for name in ("dora", "eve"):
        accounts.add_user(name)
        accounts.grant(name, 20)
    dora = {"authorization": f"Bearer {accounts.create_token('dora')}"}
    eve = {"authorization": f"Bearer {accounts.create_token('eve')}"}
    client, _ = make_client(auth="on")
    job = client.post("/api/v1/jobs", json={"prompt": "a lemon yellow square", "steps": 2}, headers=dora).json()
    image_id = wait_filed(client, job["id"], headers=dora)["result"]["images"][0]["image_id"]
    found = client.get("/api/v1/gallery/search", params={"q": "yellow square (hat:1.2)", "mode": "words"}, headers=dora)
    assert [image["id"] for image in found.json()["images"]] == [image_id]
    assert found.json()["images"][0]["src"] == f"/api/v1/gallery/images/{image_id}/file"
    assert client.get("/api/v1/gallery/search", params={"q": "yellow", "mode": "words"}, headers=eve).json() == {
        "images": []
    }
    assert client.get(f"/api/v1/gallery/images/{image_id}/file", headers=eve).status_code == 404
    assert client.get("/api/v1/gallery/feed", headers=eve).json() == {"images": []}
    published = client.post(
        f"/api/v1/gallery/images/{image_id}/visibility", json={"visibility": "public"}, headers=dora
    )
    assert published.json()["visibility"] == "public"
    assert [i["id"] for i in client.get("/api/v1/gallery/feed", headers=eve).json()["images"]] == [image_id]
    assert client.get(f"/api/v1/gallery/images/{image_id}/file", headers=eve).status_code == 200
    remix = client.post(f"/api/v1/gallery/images/{image_id}/remix", headers=eve).json()
    assert remix["request"]["prompt"] == "a lemon yellow square"


def test_the_api_index_links_every_resource(make_client):
    client, _ = make_client(start_worker=False)
    index = client.get("/api/v1").json()
    assert index["docs"] == "/docs" and client.get(index["openapi"]).status_code == 200
    for url in index["resources"].values():
        assert url in index["routes"]
    assert client.get(index["resources"]["health"]).json()["ok"] is True


def test_dns_rebinding_is_refused_without_auth(make_client, monkeypatch):
    """A page on rebind.evil that resolves to 127.0.0.1 sends Host: rebind.evil; without auth that is refused."""
    client, _ = make_client(start_worker=False)
    evil = {"host": "rebind.evil:7860", "origin": "http://rebind.evil:7860"}
    for method, url, body in (
        ("POST", "/api/v1/jobs", {"prompt": "x", "steps": 1}),
        ("DELETE", "/api/v1/concepts/anything", None),
        ("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "tiny"}),
        ("GET", "/api/v1/gallery/search?q=x", None),
        ("GET", "/", None),
    ):
        response = client.request(method, url, json=body, headers=evil)
        assert response.status_code == 403, (method, url, response.text)
        assert response.json()["error"]["field"] == "host" and "SPELLBOOK_ALLOWED_HOSTS" in response.text
    for host in ("127.0.0.1:7860", "localhost:7860", "[::1]:7860"):
        assert client.get("/api/v1/health", headers={"host": host}).status_code == 200
    named, _ = make_client(start_worker=False, allowed_hosts="studio.lan")
    assert named.get("/api/v1/health", headers={"host": "studio.lan:7860"}).status_code == 200
    assert named.get("/api/v1/health", headers={"host": "rebind.evil"}).status_code == 403


def test_no_leaks_to_strangers_health_and_file_paths(make_client, home):
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("dora")
    accounts.grant("dora", 20)
    accounts.add_user("eve")
    dora = {"authorization": f"Bearer {accounts.create_token('dora')}"}
    eve = {"authorization": f"Bearer {accounts.create_token('eve')}"}
    client, _ = make_client(auth="on")
    assert client.get("/api/v1/health").json() == {"ok": True, "version": client.get("/api/v1").json()["version"]}
    assert "jobs" in client.get("/api/v1/health", headers=dora).json()  # a signed-in caller sees the queue
    job = client.post("/api/v1/jobs", json={"prompt": "a teal circle", "steps": 2}, headers=dora).json()
    image_id = wait_filed(client, job["id"], headers=dora)["result"]["images"][0]["image_id"]
    client.post(f"/api/v1/gallery/images/{image_id}/visibility", json={"visibility": "public"}, headers=dora)
    shown = client.get(f"/api/v1/gallery/images/{image_id}", headers=eve).json()
    assert shown["src"] == f"/api/v1/gallery/images/{image_id}/file" and "path" not in shown
    assert str(home) not in json.dumps(shown)


def test_a1111_requests_without_a_size_get_the_models_native_size(make_client):
    client, _ = make_client()
    response = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2})
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert (info["width"], info["height"]) == (16, 16)  # the tiny model's own size, not A1111's 512


def test_the_same_picture_from_two_owners_is_in_both_galleries(make_client, home):
    """Alice (private) and then Bob make the same pixels: each has their own image, and Bob learns nothing."""
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    headers = {}
    for name in ("alice", "bob"):
        accounts.add_user(name)
        accounts.grant(name, 20)
        headers[name] = {"authorization": f"Bearer {accounts.create_token(name)}"}
    client, _ = make_client(auth="on")
    body = {"prompt": "a plum triangle", "steps": 2, "seed": 77}
    filed = {}
    for name in ("alice", "bob"):
        job = client.post("/api/v1/jobs", json=body, headers=headers[name]).json()
        filed[name] = wait_filed(client, job["id"], headers=headers[name])["result"]["images"][0]
    assert filed["alice"]["sha256"] == filed["bob"]["sha256"]  # the same pixels...
    assert filed["alice"]["image_id"] != filed["bob"]["image_id"]  # ...each in its owner's gallery
    for name in ("alice", "bob"):
        image_id = filed[name]["image_id"]
        assert client.get(f"/api/v1/gallery/images/{image_id}", headers=headers[name]).json()["yours"] is True
        found = client.get("/api/v1/gallery/search", params={"q": "plum", "mode": "words"}, headers=headers[name])
        assert [image["id"] for image in found.json()["images"]] == [image_id]
    assert client.get(f"/api/v1/gallery/images/{filed['alice']['image_id']}", headers=headers["bob"]).status_code == 404


def test_405_names_every_method_and_the_schema_documents_400_in_our_error_shape(make_client):
    client, _ = make_client(start_worker=False)
    for method, url, allowed in (
        ("PUT", "/api/v1/jobs", "GET, POST"),
        ("POST", "/api/v1/concepts/charlie", "GET, PATCH, DELETE"),
        ("GET", "/sdapi/v1/txt2img", "POST"),
    ):
        response = client.request(method, url)
        assert response.status_code == 405 and response.headers["allow"] == allowed, (method, url)
        assert (
            response.json()["error"]["code"] == "method_not_allowed" and allowed in response.json()["error"]["message"]
        )
    schema = client.get("/openapi.json").json()
    assert "422" not in json.dumps(schema["paths"])
    create = schema["paths"]["/api/v1/jobs"]["post"]["responses"]
    assert create["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    bad = client.post("/api/v1/jobs", json={"prompt": 3})
    assert bad.status_code == 400 and set(bad.json()["error"]) == {"code", "message", "field"}


def test_an_unwritable_images_folder_fails_the_job_once_saying_where_and_refunds(make_client, home):
    """Not "worker stopped 3 times": the job fails on its first run with the folder and the reason, refunded."""
    from datetime import UTC, datetime

    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("dora")
    accounts.grant("dora", 20)
    dora = {"authorization": f"Bearer {accounts.create_token('dora')}"}
    client, _ = make_client(auth="on")
    year = home / "images" / f"{datetime.now(UTC):%Y}"
    shutil.rmtree(year, ignore_errors=True)
    year.write_text("not a folder")  # writing under it fails, for root too (a read-only mount, a full disk)
    job = client.post("/api/v1/jobs", json={"prompt": "a red circle", "steps": 2}, headers=dora).json()
    failed = wait_done(client, job["id"], headers=dora)
    assert failed["state"] == "failed" and failed["attempts"] == 1, failed
    assert failed["error"]["code"] == "storage_failed" and str(year) in failed["error"]["message"]
    assert accounts.user("dora").balance == 20  # refunded


def test_an_idempotency_key_makes_a_retry_get_the_job_it_paid_for(make_client, home):
    """A1111 clients retry a request whose answer they lost: the same key and body give the same job, paid once;
    the same key with another body is a 409; another user's key is theirs alone."""
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env().db_path))
    headers = {}
    for name in ("dora", "eve"):
        accounts.add_user(name)
        accounts.grant(name, 20)
        headers[name] = {"authorization": f"Bearer {accounts.create_token(name)}"}
    client, _ = make_client(auth="on")
    body = {"prompt": "a red circle", "steps": 2}
    dora = {**headers["dora"], "Idempotency-Key": "retry-1"}
    first = client.post("/api/v1/jobs", json=body, headers=dora).json()
    again = client.post("/api/v1/jobs", json=body, headers=dora).json()
    assert again["id"] == first["id"] and accounts.user("dora").balance == 20 - first["cost"]
    other = client.post("/api/v1/jobs", json={**body, "prompt": "a blue circle"}, headers=dora)
    assert other.status_code == 409 and other.json()["error"]["field"] == "Idempotency-Key"
    eve = client.post("/api/v1/jobs", json=body, headers={**headers["eve"], "Idempotency-Key": "retry-1"}).json()
    assert eve["id"] != first["id"]
    # The A1111 API: a retry waits for the same job and returns the same image, paid once.
    a1111 = {**headers["dora"], "Idempotency-Key": "a1111-1"}
    balance = accounts.user("dora").balance
    images = [client.post("/sdapi/v1/txt2img", json={"prompt": "a red square", "steps": 2, "seed": -1}, headers=a1111)
              for _ in range(2)]  # fmt: skip
    assert [r.status_code for r in images] == [200, 200] and images[0].json()["images"] == images[1].json()["images"]
    assert (
        json.loads(images[0].json()["info"])["spellbook_job"] == json.loads(images[1].json()["info"])["spellbook_job"]
    )
    assert accounts.user("dora").balance == balance - wait_done(client, first["id"], headers=headers["dora"])["cost"]
    bad = client.post("/api/v1/jobs", json=body, headers={**headers["dora"], "Idempotency-Key": "\x7f"})
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "Idempotency-Key"


def test_a1111_fields_are_applied_or_refused_by_name(make_client):
    client, _ = make_client()
    base = {"prompt": "a red circle", "steps": 2, "seed": 9}
    for extra, field in (
        ({"enable_hr": True, "hr_sampler_name": "Euler"}, "hr_sampler_name"),
        ({"enable_hr": True, "hr_upscaler": "R-ESRGAN 4x+"}, "hires.upscaler"),
        ({"prompt": "a red circle <lora:add_detail:0.8>"}, "prompt"),
        ({"eta": 0.5}, "eta"),
        ({"override_settings": {"sd_vae": "nonexistent"}}, "override_settings.sd_vae"),
        ({"override_settings": {"eta_noise_seed_delta": 31337}}, "override_settings.eta_noise_seed_delta"),
        ({"made_up_field": 1}, "made_up_field"),
        ({"sampler_name": "DPM++ 2S a"}, "sampler_name"),
    ):
        response = client.post("/sdapi/v1/txt2img", json={**base, **extra})
        assert response.status_code == 400 and response.json()["error"]["field"] == field, (extra, response.text)
    # The "off" values every client sends are accepted; send_images false returns no images; n_iter runs batches.
    offs = {"enable_hr": False, "eta": 1.0, "s_noise": 1, "subseed": 123, "styles": [], "save_images": False,
            "override_settings": {"sd_vae": "Automatic"}, "sampler_name": "k_euler_a"}  # fmt: skip
    quiet = client.post("/sdapi/v1/txt2img", json={**base, **offs, "send_images": False})
    assert quiet.status_code == 200 and quiet.json()["images"] == [], quiet.text
    batches = client.post("/sdapi/v1/txt2img", json={**base, "batch_size": 2, "n_iter": 3})
    info = json.loads(batches.json()["info"])
    assert len(batches.json()["images"]) == 6 and info["all_seeds"] == [9, 10, 11, 12, 13, 14]
    assert len(info["spellbook_jobs"]) == 3
    varied = client.post("/sdapi/v1/txt2img", json={**base, "batch_size": 2, "subseed": 40, "subseed_strength": 0.5})
    varied_info = json.loads(varied.json()["info"])
    assert varied_info["all_subseeds"] == [40, 41] and "Variation seed: 41" in varied_info["infotexts"][1]
    resized = client.post("/sdapi/v1/txt2img", json={**base, "seed_resize_from_w": 16, "seed_resize_from_h": 8})
    assert "Seed resize from: 16x8" in json.loads(resized.json()["info"])["infotexts"][0], resized.text
    samplers = {s["name"]: s["aliases"] for s in client.get("/sdapi/v1/samplers").json()}
    assert "k_euler_a" in samplers["Euler a"]


def test_a1111_options_post_accepts_the_whole_dict_all_or_nothing(make_client):
    """Open WebUI GETs the options, changes the model, POSTs the whole dict back."""
    client, services = make_client(start_worker=False)
    options = client.get("/sdapi/v1/options").json()
    options["sd_model_checkpoint"] = "shapes"
    done = client.post("/sdapi/v1/options", json={**options, "some_ui_setting": True})
    assert done.status_code == 200, done.text
    assert services.default_model == "shapes" and "sd_checkpoint_hash" in done.headers["x-spellbook-ignored-options"]
    refused = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2})
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "CLIP_stop_at_last_layers"
    assert services.default_model == "shapes"  # nothing applied


def test_a1111_interrupt_answers_200_with_the_batches_finished(make_client):
    client, services = make_client()
    body = {"prompt": "a red circle", "steps": 60, "seed": 1, "width": 64, "height": 64, "n_iter": 3}
    with ThreadPoolExecutor(1) as pool:
        call = pool.submit(client.post, "/sdapi/v1/txt2img", json=body)
        deadline = time.monotonic() + 60
        while not any(j.state == "running" for j in services.queue.list(all_users=True)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.post("/sdapi/v1/interrupt").status_code == 200
        response = call.result(timeout=120)
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) < 3


def test_a1111_surface_lists_and_extras(make_client):
    client, _ = make_client(start_worker=False)
    for url in ("loras", "prompt-styles", "face-restorers", "hypernetworks", "realesrgan-models", "sd-vae"):
        assert client.get(f"/sdapi/v1/{url}").json() == [], url
    modes = [mode["name"] for mode in client.get("/sdapi/v1/latent-upscale-modes").json()]
    assert modes[0] == "Latent" and "Latent (nearest-exact)" in modes
    assert {u["name"] for u in client.get("/sdapi/v1/upscalers").json()} == {"None", "Lanczos", "Nearest"}
    for url in ("refresh-checkpoints", "refresh-vae", "refresh-loras", "refresh-embeddings", "skip"):
        assert client.post(f"/sdapi/v1/{url}").status_code == 200, url
    assert "ram" in client.get("/sdapi/v1/memory").json()
    assert client.post("/sdapi/v1/interrogate", json={"image": ""}).status_code == 501
    picture = png_b64(Image.new("RGB", (10, 6), (200, 10, 10)))
    big = client.post(
        "/sdapi/v1/extra-single-image", json={"image": picture, "upscaling_resize": 3, "upscaler_1": "Lanczos"}
    )
    resized = Image.open(io.BytesIO(base64.b64decode(big.json()["image"])))
    assert resized.size == (30, 18) and resized.getpixel((15, 9))[0] > 150
    nope = client.post("/sdapi/v1/extra-single-image", json={"image": picture, "upscaler_1": "R-ESRGAN 4x+"})
    assert nope.status_code == 400 and nope.json()["error"]["field"] == "upscaler_1"


def test_a1111_inpaint_options_mask_blur_invert_and_fill(make_client):
    from spellbook.server.a1111 import A1111Request, _mask, fill_masked

    square = Image.new("L", (16, 16), 0)
    square.paste(255, (4, 4, 12, 12))
    body = A1111Request(init_images=[""], mask=png_b64(square), mask_blur=2, inpainting_mask_invert=1)
    mask = _mask(body, 1 << 20)
    assert mask.getpixel((8, 8)) < 60 and mask.getpixel((0, 0)) > 230 and 60 < mask.getpixel((4, 8)) < 200
    picture = Image.new("RGB", (16, 16), (0, 0, 255))
    picture.paste((255, 0, 0), (4, 4, 12, 12))
    filled = fill_masked(picture, square)
    assert filled.getpixel((8, 8))[2] > 200 and filled.getpixel((0, 0)) == (
        0,
        0,
        255,
    )  # the hole takes the blue around it
    client, _ = make_client(start_worker=False)
    refused = client.post("/sdapi/v1/img2img", json={"prompt": "x", "init_images": [png_b64(picture)],
                                                     "mask": png_b64(square), "inpaint_full_res": True})  # fmt: skip
    assert refused.status_code == 400 and refused.json()["error"]["field"] == "inpaint_full_res"


def test_a1111_styles_are_applied_from_the_library(make_client, home):
    (home / "styles.csv").write_text('name,prompt,negative_prompt\nOil,"oil painting of {prompt}",photo\n')
    client, _ = make_client()
    assert client.get("/sdapi/v1/prompt-styles").json() == [
        {"name": "Oil", "prompt": "oil painting of {prompt}", "negative_prompt": "photo"}
    ]
    done = client.post("/sdapi/v1/txt2img", json={"prompt": "a red circle", "steps": 2, "styles": ["Oil"]})
    info = json.loads(done.json()["info"])
    assert info["prompt"] == "oil painting of a red circle" and info["negative_prompt"] == "photo"
    assert info["styles"] == ["Oil"]
    unknown = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "styles": ["cinematic"]})
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "styles"
