"""Nothing is lost: kill -9 of workers (scale-out over Redis) and of the embedded server; restarts."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from spellbook.settings import Settings

REDIS = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def spellbook(*args: str, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "spellbook.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@pytest.fixture
def redis_url(tmp_path):
    if REDIS is None:
        pytest.skip("redis-server is not installed (make test installs it)")
    port = free_port()
    process = subprocess.Popen(
        [REDIS, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    import redis

    client = redis.Redis.from_url(url)
    wait_for(lambda: _pings(client), 10, "redis")
    yield url
    process.terminate()
    process.wait(10)


def _pings(client) -> bool:
    import redis

    try:
        return client.ping()
    except redis.ConnectionError:
        return False


def test_scale_out_survives_a_killed_worker(redis_url, home, tmp_path):
    import redis
    from fastapi.testclient import TestClient

    from spellbook.queue.celery import make_celery
    from spellbook.server.app import build_services, create_app

    env = {"SPELLBOOK_VISIBILITY_TIMEOUT": "6", "SPELLBOOK_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    settings = Settings.from_env(broker=redis_url, visibility_timeout=6, lease_seconds=120)
    # Jobs submitted while no dispatcher runs (a server restarted with a full queue) run once it is back.
    queued_only = build_services(settings, start_worker=False)
    early = [queued_only.queue.submit(_recipe(queued_only, i), owner=None).id for i in range(4)]
    workers = [
        spellbook(
            "worker", "--broker", redis_url, "--name", f"w{i}", env={**env, "SPELLBOOK_HOME": str(tmp_path / f"w{i}")}
        )
        for i in range(2)
    ]
    try:
        # Both workers listening before any task is sent, so both take a share of the work.
        control = make_celery(settings).control
        wait_for(lambda: len(control.ping(timeout=0.5)) == 2, 180, "both workers up")
        services = build_services(settings)
        with TestClient(create_app(settings, services=services), base_url="http://127.0.0.1") as client:
            ids = early + [
                client.post("/api/v1/jobs", json={"prompt": f"a red circle {i}", "seed": i, "steps": 12}).json()["id"]
                for i in range(12)
            ]
            # Kill one worker while it runs a task: after the first results, at a moment when both workers hold
            # one (prefetch 1, acks late: each running task is one unacknowledged message in Redis).
            broker = redis.Redis.from_url(redis_url)
            wait_for(
                lambda: services.queue.counts()["done"] >= 3 and broker.hlen("unacked") == 2,
                180,
                "first results, both workers running a task",
            )
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait(10)
            # Its jobs stay leased by the dispatcher (lease 120 s), so they finish only through Redis redelivery.
            wait_for(lambda: services.queue.counts()["done"] == len(ids), 120, "every job done")
            jobs = [services.queue.get(job_id) for job_id in ids]
            assert all(job.state == "done" for job in jobs)
            for job in jobs:
                images = job.result["images"]
                assert len(images) == 1 and (home / images[0]["path"]).is_file()
            # Exactly once: one result per job and one image file per job.
            files = list((home / "images").rglob("*.png"))
            assert len(files) == len(ids) == 16
    finally:
        for worker in workers:
            worker.kill()
            worker.wait(10)


def _recipe(services, i):
    recipe = services.studio.plan({"prompt": f"a blue square {i}", "seed": 100 + i, "steps": 12})
    return recipe


def test_embedded_server_killed_mid_job_runs_it_again_once(home, tmp_path):
    port = free_port()
    env = {"SPELLBOOK_HOME": str(home), "SPELLBOOK_THREADS": "1"}
    base = f"http://127.0.0.1:{port}"
    server = spellbook("serve", "--port", str(port), env=env)
    try:
        wait_for(lambda: _up(base), 120, "server start")
        # Long enough (the model loads, then 30 steps) to be killed while running; it runs once more in full.
        body = {"prompt": "a green triangle", "seed": 5, "steps": 30, "width": 64, "height": 64, "batch_size": 2}
        job_id = httpx.post(f"{base}/api/v1/jobs", json=body).json()["id"]
        wait_for(lambda: httpx.get(f"{base}/api/v1/jobs/{job_id}").json()["state"] == "running", 60, "job running")
        server.send_signal(signal.SIGKILL)
        server.wait(10)
        server = spellbook("serve", "--port", str(port), env=env)
        wait_for(lambda: _up(base), 120, "server restart")
        job = wait_for(lambda: _final(base, job_id), 300, "job done after restart")
        assert job["state"] == "done" and job["attempts"] == 2
        assert len(list((home / "images").rglob(f"{job_id}-*.png"))) == 2
    finally:
        server.kill()
        server.wait(10)


def test_sigterm_exits_in_seconds_with_an_abandoned_a1111_request_whose_job_runs_after_restart(home):
    """An A1111 client starts a long txt2img and goes away; SIGTERM must not wait for that job (it was minutes);
    the job keeps its place and runs again when the server is back (cancelled there: it would take a minute)."""
    port = free_port()
    env = {"SPELLBOOK_HOME": str(home), "SPELLBOOK_THREADS": "1"}
    base = f"http://127.0.0.1:{port}"
    server = spellbook("serve", "--port", str(port), env=env)
    try:
        wait_for(lambda: _up(base), 120, "server start")
        body = {"prompt": "a green triangle", "seed": 5, "steps": 150, "width": 128, "height": 128, "batch_size": 4}
        with pytest.raises(httpx.TimeoutException):  # the client gives up and goes away
            httpx.post(f"{base}/sdapi/v1/txt2img", json=body, timeout=1)
        job_id = wait_for(lambda: _running(base), 60, "job running")
        started = time.monotonic()
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        assert time.monotonic() - started < 10, "SIGTERM waited for the abandoned job"
        # uvicorn shuts down gracefully, then re-raises the signal, so the exit status still says SIGTERM.
        log = server.stderr.read().decode()
        assert server.returncode in (0, -signal.SIGTERM) and "Traceback" not in log, log[-2000:]
        server = spellbook("serve", "--port", str(port), env=env)
        wait_for(lambda: _up(base), 120, "server restart")
        job = wait_for(lambda: _running_again(base, job_id), 60, "job running again after restart")
        assert job["attempts"] == 2
        assert httpx.post(f"{base}/api/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    finally:
        server.kill()
        server.wait(10)


def _running_again(base: str, job_id: str):
    job = httpx.get(f"{base}/api/v1/jobs/{job_id}").json()
    return job if job["state"] == "running" else None


def _running(base: str) -> str | None:
    jobs = httpx.get(f"{base}/api/v1/jobs").json()
    return next((job["id"] for job in jobs if job["state"] == "running"), None)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _final(base: str, job_id: str):
    job = httpx.get(f"{base}/api/v1/jobs/{job_id}").json()
    return job if job["state"] in ("done", "failed", "cancelled") else None


def test_worker_and_serve_refuse_a_public_bind_without_admin(home, capsys, monkeypatch):
    # In-process, through the console script's entry (`main`): the refusal comes before anything starts, so a
    # second interpreter (seconds of imports) would prove nothing more; test_cli runs the real process.
    from clirun import run_cli

    code, _, err = run_cli(["serve", "--host", "0.0.0.0", "--port", free_port()], capsys, monkeypatch)
    assert code == 2 and "no admin user" in err and "Traceback" not in err
    assert Path(home / "spellbook.db").exists()


SETPRIV = shutil.which("setpriv")


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None, reason="runs the server as another user (needs root)")
def test_a_home_the_server_cannot_write_is_one_line_and_exit_2_before_it_says_it_serves(request):
    """A read-only database, then a read-only images folder: said at start, not as a traceback or per job."""
    import tempfile

    from spellbook.store.db import Database

    home = Path(tempfile.mkdtemp(prefix="spellbook-readonly-", dir="/tmp"))  # pytest's tmp is root's alone
    request.addfinalizer(lambda: shutil.rmtree(home, ignore_errors=True))
    Database(home / "spellbook.db").close()
    nobody = [SETPRIV, "--reuid=65534", "--regid=65534", "--clear-groups"]
    home.chmod(0o755)
    (home / "spellbook.db").chmod(0o644)
    for expected in ("cannot open the database", "cannot write"):
        run = subprocess.run(
            [*nobody, sys.executable, "-m", "spellbook.cli", "serve", "--port", str(free_port())],
            env={**os.environ, "SPELLBOOK_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 2 and expected in run.stderr, run.stderr[-2000:]
        assert "Traceback" not in run.stderr and "Spellbook on" not in run.stdout
        assert len(run.stderr.strip().splitlines()) == 1, run.stderr
        # Now the database is writable, the images folder not.
        home.chmod(0o777)
        for path in home.glob("spellbook.db*"):
            path.chmod(0o666)
        (home / "images").mkdir(exist_ok=True)
        (home / "images").chmod(0o755)
