"""/api/v1/concepts: list, show, download, upload (safetensors only), delete, and training as a queued job."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import pickle
import subprocess
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load

from jobwait import wait_done
from spellbook.concepts.formats import A1111, DIFFUSERS, Concept, concept_bytes
from spellbook.server.concept_routes import UPLOAD_MAX_BYTES
from spellbook.settings import Settings
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database

WIDTH = 32  # the tiny model's text encoder


@pytest.fixture(autouse=True)
def one_thread():
    """Training many tiny steps: a second thread only adds waiting on a shared 2-core machine (test_concepts.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def make_client(make_client):
    """The shared TestClient factory (conftest.py) with short leases: a cancelled training is seen fast."""
    return functools.partial(make_client, lease_seconds=2)


def concept_file(name: str = "charlie", n: int = 1, width: int = WIDTH, fmt: str = A1111, seed: int = 0) -> bytes:
    vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
    return concept_bytes(Concept(name, vectors, metadata={"model": "tiny"}), fmt)


def upload(client, data: bytes, filename: str = "charlie.safetensors", headers=None, **fields):
    files = {"file": (filename, data, "application/octet-stream")}
    return client.post("/api/v1/concepts", files=files, data=fields, headers=headers)


def png(seed: int, size: int = 16) -> bytes:
    pixels = np.full((size, size, 3), 20, dtype=np.uint8)
    pixels[3 + seed % 4 : 11 + seed % 4, 4:12] = (220, 40 + 60 * (seed % 4), 40)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def train(client, headers=None, pictures=3, **fields):
    files = [("images", (f"{i}.png", png(i), "image/png")) for i in range(pictures)]
    data = {"name": "blob", "steps": 4, "batch_size": 2, **fields}
    return client.post(
        "/api/v1/concepts/train", data={k: str(v) for k, v in data.items()}, files=files, headers=headers
    )


def users(*names, admin=(), credits=100):
    accounts = Accounts(Database(Settings.from_env().db_path))
    tokens = {}
    for name in names:
        accounts.add_user(name, admin=name in admin)
        if credits:
            accounts.grant(name, credits)
        tokens[name] = {"authorization": f"Bearer {accounts.create_token(name)}"}
    return accounts, tokens


# --- the library over HTTP -------------------------------------------------------------------------------------


def test_an_uploaded_concept_is_listed_downloadable_in_both_layouts_usable_and_removable(make_client, home):
    client, _ = make_client(start_worker=False)
    data = concept_file(n=2)
    response = upload(client, data)
    assert response.status_code == 201, response.text
    concept = response.json()
    assert (concept["name"], concept["vectors"], concept["dims"], concept["trained_for"]) == (
        "charlie",
        2,
        WIDTH,
        "tiny",
    )
    assert concept["size_bytes"] == len(data) and concept["sha256"] == hashlib.sha256(data).hexdigest()
    assert concept["hash"] == concept["sha256"][:12] and "path" not in concept  # no server paths shown
    assert [c["name"] for c in client.get("/api/v1/concepts").json()["concepts"]] == ["charlie"]
    assert client.get("/api/v1/concepts/<charlie>").json()["sha256"] == concept["sha256"]

    # As stored: byte for byte (so its hash stays the TI hash A1111 and Civitai show), as an attachment.
    original = client.get(concept["files"]["original"])
    assert original.content == data
    assert original.headers["content-disposition"] == 'attachment; filename="charlie.safetensors"'
    vectors = load(data)["emb_params"]
    for fmt, key in ((A1111, "emb_params"), (DIFFUSERS, "<charlie>")):
        response = client.get(concept["files"][fmt])
        assert response.status_code == 200 and response.headers["content-disposition"].startswith("attachment;")
        tensors = load(response.content)
        assert list(tensors) == [key] and torch.equal(tensors[key], vectors)

    # A prompt naming it records it in the job's recipe, by name and hash.
    job = client.post("/api/v1/jobs", json={"prompt": "a <charlie> on the left"}).json()
    assert job["recipe"]["concepts"] == [{"name": "charlie", "sha256": concept["sha256"], "bare_word": False}]
    # Uploaded over the API, only the bracketed form means it; its owner can give it the plain word.
    assert client.post("/api/v1/jobs", json={"prompt": "a charlie"}).json()["recipe"]["concepts"] == []
    assert client.patch("/api/v1/concepts/charlie", json={"bare_word": True}).json()["bare_word"] is True
    plain = client.post("/api/v1/jobs", json={"prompt": "a charlie"}).json()["recipe"]["concepts"]
    assert plain == [{"name": "charlie", "sha256": concept["sha256"]}]

    assert client.delete("/api/v1/concepts/charlie").status_code == 204
    missing = client.get("/api/v1/concepts/charlie")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert not (home / "concepts" / "charlie.safetensors").exists()


class Payload:
    """Unpickling this writes a file: proof that something was unpickled."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_refused_without_being_unpickled(make_client, home, tmp_path):
    client, _ = make_client(start_worker=False)
    marker = tmp_path / "unpickled"
    Payload.marker = str(marker)
    torch_zip = io.BytesIO()
    torch.save({"<x>": Payload()}, torch_zip)
    raw_pickle = pickle.dumps({"<x>": Payload()}, protocol=4)
    cases = [
        ("x.pt", torch_zip.getvalue()),
        ("learned_embeds.bin", raw_pickle),
        ("x.ckpt", concept_file()),  # refused by its name alone
        ("x.safetensors", torch_zip.getvalue()),  # a pickle under a safetensors name: refused by its bytes
        ("x.safetensors", raw_pickle),
    ]
    for filename, data in cases:
        response = upload(client, data, filename)
        assert response.status_code == 400, (filename, response.text)
        error = response.json()["error"]
        assert error["code"] == "refused" and error["field"] == "file" and "pickle" in error["message"], error
    not_safetensors = upload(client, b"hello, this is not an embedding", "x.safetensors")
    assert not_safetensors.status_code == 400 and not_safetensors.json()["error"]["field"] == "file"
    assert not marker.exists()
    assert client.get("/api/v1/concepts").json() == {"concepts": []}


def test_names_are_confined_to_the_library(make_client, home):
    client, _ = make_client(start_worker=False)
    for name in ("../evil", "a/b", "..", "two words", "-dash"):
        response = upload(client, concept_file(), name=name)
        assert response.status_code == 400, name
        assert response.json()["error"]["field"] == "name"
    # The uploaded file's own name counts only by its last part.
    response = upload(client, concept_file(), "../../evil.safetensors")
    assert response.status_code == 201 and response.json()["name"] == "evil"
    assert sorted(p.name for p in (home / "concepts").iterdir()) == ["evil.json", "evil.safetensors"]
    assert not (home / "evil.safetensors").exists()
    for path in ("..%2F..%2Fspellbook.db", "..%2Fconcepts%2Fevil", "%2Fetc%2Fpasswd"):
        response = client.get(f"/api/v1/concepts/{path}/file")
        assert response.status_code in (400, 404) and "error" in response.json(), path
    taken = upload(client, concept_file(seed=1), "other.safetensors", name="evil")
    assert taken.status_code == 409 and taken.json()["error"]["field"] == "name"


def test_an_oversized_upload_is_413(make_client):
    client, _ = make_client(start_worker=False)
    response = upload(client, b"\0" * (UPLOAD_MAX_BYTES + 1))
    assert response.status_code == 413 and response.json()["error"]["field"] == "file"


def test_a_concept_for_another_text_encoder_width_is_reported_with_both_widths(make_client):
    client, _ = make_client(start_worker=False)
    sd1 = concept_file("wide", width=768)
    refused = upload(client, sd1, "wide.safetensors", model="tiny")
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert error["field"] == "file" and "768" in error["message"] and "32" in error["message"]
    assert client.get("/api/v1/concepts").json() == {"concepts": []}
    # Without a model to check against it is accepted (another model may fit it), and a prompt using it with
    # a model it does not fit is a 400 naming both widths.
    assert upload(client, sd1, "wide.safetensors").json()["dims"] == 768
    job = client.post("/api/v1/jobs", json={"prompt": "a <wide>"})
    assert job.status_code == 400 and job.json()["error"]["field"] == "concepts"
    assert "768" in job.json()["error"]["message"]
    # A1111 clients see it among the embeddings the default model skips, with a fitting one loaded.
    assert upload(client, concept_file("fits", n=2), "fits.safetensors").status_code == 201
    listed = client.get("/sdapi/v1/embeddings").json()
    assert listed["loaded"]["fits"]["vectors"] == 2 and listed["loaded"]["fits"]["shape"] == WIDTH
    assert listed["skipped"]["wide"]["shape"] == 768 and "wide" not in listed["loaded"]


def test_a_users_concepts_are_theirs_and_never_change_another_users_words(make_client, home):
    """Alice uploads `circle` and a too-wide `square`: Bob's prompts mean what they meant (same pixels), Bob cannot
    see, fetch or delete them and may have his own `circle`; the shared library is the admin's."""
    _, tokens = users("root", "alice", "bob", admin=("root",))
    alice, bob, root = tokens["alice"], tokens["bob"], tokens["root"]
    client, _ = make_client(auth="on")
    assert client.get("/api/v1/concepts").status_code == 401
    assert upload(client, concept_file()).status_code == 401

    def made(prompt, headers):
        job = client.post("/api/v1/jobs", json={"prompt": prompt, "steps": 2, "seed": 5}, headers=headers)
        assert job.status_code == 202, job.text
        done = wait_done(client, job.json()["id"], headers=headers)
        return done["recipe"]["concepts"], done["result"]["images"][0]["sha256"]

    before = made("a red circle", bob)
    mine = upload(client, concept_file("circle", seed=1), "circle.safetensors", headers=alice)
    assert mine.status_code == 201, mine.text
    assert (mine.json()["scope"], mine.json()["bare_word"], mine.json()["yours"]) == ("own", False, True)
    assert upload(client, concept_file("square", width=768), "square.safetensors", headers=alice).status_code == 201
    assert made("a red circle", bob) == before  # Bob's words are untouched...
    assert made("a red square", bob)[0] == []  # ...and his squares still draw
    assert made("a red circle", alice)[0] == []  # Alice's own plain word too, until she opts in
    assert made("a red <circle>", alice)[0] == [{"name": "circle", "sha256": mine.json()["sha256"], "bare_word": False}]
    wide = client.post("/api/v1/jobs", json={"prompt": "a <square>"}, headers=alice)
    assert wide.status_code == 400 and "768" in wide.text
    assert client.patch("/api/v1/concepts/circle", json={"bare_word": True}, headers=alice).status_code == 200
    assert made("a red circle", alice)[0][0]["name"] == "circle"
    assert made("a red circle", bob) == before

    # Bob sees none of it, and may have his own `circle`.
    assert client.get("/api/v1/concepts", headers=bob).json() == {"concepts": []}
    for method, url in (("GET", "/api/v1/concepts/circle"), ("GET", "/api/v1/concepts/circle/file"),
                        ("DELETE", "/api/v1/concepts/circle")):  # fmt: skip
        assert client.request(method, url, headers=bob).status_code == 404, (method, url)
    assert "circle" not in client.get("/sdapi/v1/embeddings", headers=bob).json()["loaded"]
    his = upload(client, concept_file("circle", seed=2), "circle.safetensors", headers=bob)
    assert his.status_code == 201 and his.json()["sha256"] != mine.json()["sha256"]
    assert made("a <circle>", bob)[0][0]["sha256"] == his.json()["sha256"]

    # The shared library is the admin's: everyone uses it, only an admin changes it; a user's name may not
    # shadow a shared one, and each user deletes their own.
    shared = upload(client, concept_file("otter", seed=3), "otter.safetensors", headers=root)
    assert shared.status_code == 201 and (home / "concepts" / "otter.safetensors").is_file()
    assert made("an <otter>", bob)[0][0]["sha256"] == shared.json()["sha256"]
    assert upload(client, concept_file("otter"), "otter.safetensors", headers=alice).status_code == 409
    forbidden = client.delete("/api/v1/concepts/otter", headers=alice)
    assert forbidden.status_code == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert client.delete("/api/v1/concepts/circle", headers=alice).status_code == 204
    assert client.get("/api/v1/concepts/circle", headers=bob).json()["sha256"] == his.json()["sha256"]
    assert client.delete("/api/v1/concepts/otter", headers=root).status_code == 204


# --- training as a job -----------------------------------------------------------------------------------------


def test_training_is_a_paid_job_with_step_progress_and_its_concept_joins_the_library(make_client, home):
    accounts, tokens = users("alice", credits=10)
    alice = tokens["alice"]
    client, _ = make_client(auth="on")
    response = train(client, alice, steps=4, batch_size=2)
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["kind"] == "concept" and job["cost"] >= 1 and job["concept"]["name"] == "blob"
    progress = []
    with client.stream("GET", f"/api/v1/jobs/{job['id']}/events", headers=alice) as stream:
        event = None
        for line in stream.iter_lines():
            if line.startswith("event: "):
                event = line.removeprefix("event: ")
            elif line.startswith("data: ") and event == "progress":
                progress.append(json.loads(line.removeprefix("data: ")))
    assert event == "done"
    steps = [(p["step"], p["total"]) for p in progress if "total" in p]
    assert steps and all(total == 4 and 0 <= step <= 4 for step, total in steps), progress
    done = client.get(f"/api/v1/jobs/{job['id']}", headers=alice).json()
    assert done["state"] == "done" and done["result"]["steps"] == 4
    concept = client.get("/api/v1/concepts/blob", headers=alice).json()
    assert (concept["vectors"], concept["dims"], concept["trained_for"]) == (1, WIDTH, "tiny")
    assert done["result"]["concept"]["sha256"] == concept["sha256"]
    sample = client.get(concept["sample"], headers=alice)
    assert sample.status_code == 200 and sample.content[:4] == b"\x89PNG"
    assert accounts.user("alice").balance == 10 - job["cost"]
    assert accounts.ledger("alice")[0] | {"id": 0, "created": ""} == {
        "id": 0, "delta": -job["cost"], "reason": "debit", "job_id": job["id"], "note": "", "created": ""
    }  # fmt: skip
    assert not (home / "concepts" / ".jobs" / job["id"]).exists()  # the scratch folder is gone
    again = train(client, alice)
    assert again.status_code == 409 and again.json()["error"]["field"] == "name"


def test_a_training_can_be_cancelled_and_is_refunded(make_client, home):
    accounts, tokens = users("alice", credits=1000)
    alice = tokens["alice"]
    client, services = make_client(auth="on")
    job = train(client, alice, steps=5000, batch_size=1).json()
    deadline = time.monotonic() + 60
    while (client.get(f"/api/v1/jobs/{job['id']}", headers=alice).json().get("step") or 0) < 1:
        assert time.monotonic() < deadline, "the training did not start"
        time.sleep(0.05)
    assert client.post(f"/api/v1/jobs/{job['id']}/cancel", headers=alice).json()["state"] == "cancelled"
    scratch = home / "concepts" / ".jobs" / job["id"]
    deadline = time.monotonic() + 30
    while scratch.exists() or services.live(job["id"]) is not None:  # the worker stops at its next step
        assert time.monotonic() < deadline, "the training did not stop"
        time.sleep(0.05)
    assert accounts.user("alice").balance == 1000
    assert [row["reason"] for row in accounts.ledger("alice")[:2]] == ["refund", "debit"]
    assert client.get("/api/v1/concepts", headers=alice).json() == {"concepts": []}


def test_a_training_left_running_by_a_dead_server_runs_again_after_restart(make_client):
    client, services = make_client(start_worker=False)
    job = train(client).json()
    assert [j.id for j in services.queue.lease("embedded:dead-host:1:gone")] == [job["id"]]
    restarted, _ = make_client()
    done = wait_done(restarted, job["id"])
    assert done["state"] == "done" and done["attempts"] == 2
    assert restarted.get("/api/v1/concepts/blob").status_code == 200


@pytest.mark.parametrize(
    "fields, pictures, field",
    [
        ({"name": "../x"}, 3, "name"),
        ({"steps": 0}, 3, "steps"),
        ({"vectors": 76}, 3, "vectors"),
        ({"model": "../../etc"}, 3, "model"),
        ({}, 0, "images"),
        ({}, 21, "images"),
    ],
)
def test_training_requests_are_checked_before_they_queue(make_client, fields, pictures, field):
    client, services = make_client(start_worker=False)
    response = train(client, pictures=pictures, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field
    assert services.queue.counts()["queued"] == 0


def test_a_picture_that_is_not_an_image_or_too_large_is_refused(make_client):
    from test_server import huge_png_header

    client, services = make_client(start_worker=False)
    for data, status in ((b"not a picture", 400), (huge_png_header(60_000, 60_000), 413)):
        files = [("images", ("0.png", png(0), "image/png")), ("images", ("1.png", data, "image/png"))]
        response = client.post("/api/v1/concepts/train", data={"name": "blob"}, files=files)
        assert response.status_code == status and response.json()["error"]["field"] == "images"
    assert services.queue.counts()["queued"] == 0


def test_a_stopped_training_resumes_from_its_checkpoint_to_the_same_concept(studio, tmp_path):
    from spellbook.queue.training import ConceptJobSpec, run_concept_job

    pictures = [Image.open(io.BytesIO(png(i))) for i in range(3)]
    components = studio.components_for("tiny")
    spec = ConceptJobSpec("blob", "tiny", components.ref.sha256, None, 1, 6, 0, 2, ("a", "b", "c"))
    whole = run_concept_job(studio, spec, pictures, tmp_path / "whole")

    def stop_at_4(step, total, loss):
        if step == 4:
            raise KeyboardInterrupt  # what a stop leaves: the checkpoint of the last finished step

    with pytest.raises(KeyboardInterrupt):
        run_concept_job(studio, spec, pictures, tmp_path / "stopped", progress=stop_at_4)
    seen = []
    resumed = run_concept_job(studio, spec, pictures, tmp_path / "stopped", progress=lambda s, t, _: seen.append(s))
    assert seen == [5, 6] and resumed.steps == 6
    assert resumed.data == whole.data


def test_scale_out_workers_train_concepts_too(make_client, home, tiny_model_dir, tmp_path):
    """The Celery path: the pictures travel in the task, the trained file comes back in its result."""
    import redis
    from celery.contrib.testing.worker import start_worker

    from spellbook.queue.celery import make_celery, register_task
    from spellbook.studio import Studio
    from test_reliability import REDIS, _pings, free_port, wait_for

    if REDIS is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    server = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: _pings(redis.Redis.from_url(broker)), 10, "redis")
        worker_settings = Settings.from_env(env={}, home=str(tmp_path / "worker"), broker=broker)
        Studio(worker_settings).cache.registry.add(tiny_model_dir, "tiny")  # the worker's own models folder
        app = make_celery(worker_settings)
        register_task(app, worker_settings)
        with start_worker(app, pool="solo", perform_ping_check=False, loglevel="WARNING", shutdown_timeout=10):
            client, services = make_client(broker=broker)
            assert services.dispatcher is not None and services.worker is None
            job = train(client).json()
            done = wait_done(client, job["id"])
            assert done["state"] == "done" and done["result"]["steps"] == 4, done
        concept = client.get("/api/v1/concepts/blob").json()
        assert concept["sha256"] == done["result"]["concept"]["sha256"] and concept["sample"]
        assert (home / "concepts" / "blob.safetensors").is_file()
        assert not list((tmp_path / "worker" / "concepts").rglob("*.safetensors"))  # nothing left on the worker
    finally:
        server.terminate()
        server.wait(10)
