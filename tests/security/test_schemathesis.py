"""Schemathesis with every check against a live `spellbook serve` (auth on): 0 failures.

tests/test_api_fuzz.py fuzzes the app in process for 5xx only; this runs the schemathesis CLI against a real
server process, as a client on the network sees it: all checks (status codes, content types, response schemas
and headers, positive and negative data, auth, Allow headers, use after free, …) and all four phases
(examples, coverage, fuzzing, stateful), within a time budget. Settings that widen a check for a documented
rejection are in schemathesis.toml beside this file, each with its reason.

SPELLBOOK_SECURITY_MAX_TIME (seconds, default 120) and SPELLBOOK_SECURITY_MAX_EXAMPLES (per operation and
phase, default 10) size the run; SPELLBOOK_SECURITY_SEED replays a run (the report prints its seed).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_TIME = int(os.environ.get("SPELLBOOK_SECURITY_MAX_TIME", "120"))
MAX_EXAMPLES = int(os.environ.get("SPELLBOOK_SECURITY_MAX_EXAMPLES", "10"))

# Not fuzzed here:
# - POST /sdapi/v1/txt2img and /sdapi/v1/img2img hold the request open until the generation is done (A1111's
#   synchronous API): each accepted case would wait for the queue, so the budget would go to waiting, not to
#   testing. Their validation is the native job's (POST /api/v1/jobs, fuzzed here), and test_server.py and
#   test_api_fuzz.py cover them end to end.
# - GET /api/v1/jobs/{job_id}/events is a server-sent-events stream that stays open until its job ends.
EXCLUDED = r"^/sdapi/v1/(txt2img|img2img)$|/events$"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def admin_token(home: Path) -> str:
    """An admin with credits to spare (accepted jobs are paid), and a token for it."""
    from spellbook.settings import Settings
    from spellbook.store.accounts import Accounts
    from spellbook.store.db import Database

    accounts = Accounts(Database(Settings.from_env(home=str(home)).db_path))
    accounts.add_user("fuzzer", admin=True)
    accounts.grant("fuzzer", 1_000_000, "schemathesis")
    return accounts.create_token("fuzzer", "schemathesis")


def wait_up(base: str, server: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the server exited ({server.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{base}/api/v1/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("the server did not answer /api/v1/health in time")


@pytest.fixture
def live_server(home, tmp_path):
    """`spellbook serve` in its own process: auth on, the embedded worker running jobs on the shipped `shapes`
    model, kept small (accepted jobs really run while the fuzzer goes on)."""
    token = admin_token(home)
    port = free_port()
    env = {
        **os.environ,
        "SPELLBOOK_HOME": str(home),
        "SPELLBOOK_AUTH": "on",
        "SPELLBOOK_THREADS": "1",
        "SPELLBOOK_MAX_STEPS": "8",
        "SPELLBOOK_MAX_PIXELS": str(64 * 64),
        "SPELLBOOK_MAX_BATCH": "2",
        "PYTHONUNBUFFERED": "1",
    }
    log = tmp_path / "server.log"  # a file, not a pipe: a pipe nobody reads would block a chatty server
    output = log.open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "spellbook.cli", "serve", "--port", str(port)],
        env=env,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_up(base, server, log)
        yield base, token, server, log
    finally:
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(10)
        output.close()


def test_schemathesis_all_checks_pass_against_a_live_server(live_server, tmp_path):
    base, token, server, log = live_server
    command = [
        str(SCHEMATHESIS),
        "--config-file",
        str(HERE / "schemathesis.toml"),
        "run",
        f"{base}/openapi.json",
        "--checks",
        "all",
        "--phases",
        "examples,coverage,fuzzing,stateful",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--max-time",
        str(MAX_TIME),
        "--workers",
        "1",
        "--request-timeout",
        "30",
        "--exclude-path-regex",
        EXCLUDED,
        "--header",
        f"Authorization: Bearer {token}",
        "--generation-database",
        "none",
        "--no-color",
    ]
    if os.environ.get("SPELLBOOK_SECURITY_SEED"):
        command += ["--seed", os.environ["SPELLBOOK_SECURITY_SEED"]]
    # In a scratch folder: nothing the run writes lands in the checkout.
    result = subprocess.run(command, check=False, cwd=tmp_path, capture_output=True, text=True, timeout=MAX_TIME + 240)
    report = result.stdout + result.stderr
    # The report from its ERRORS / FAILURES sections on (the progress lines before them say little).
    sections = [report.find(f"=== {name} ===") for name in ("ERRORS", "FAILURES", "WARNINGS", "SUMMARY")]
    failures = report[max(0, min([i for i in sections if i >= 0], default=0) - 40) :]
    assert result.returncode == 0, f"schemathesis found failures (exit {result.returncode}):\n{failures[-30000:]}"
    # Every phase ran, the stateful one included (a phase with nothing to do would say "skipped").
    for phase in ("Coverage", "Fuzzing", "Stateful"):
        assert re.search(rf"✅ +{phase}", report), f"the {phase} phase did not run and pass:\n{report[-5000:]}"
    assert server.poll() is None, f"the server died during the run:\n{log.read_text()[-3000:]}"
    assert "Traceback" not in log.read_text(), f"the server logged an error:\n{log.read_text()[-5000:]}"
