"""Fuzz the OpenAPI schema (schemathesis, bounded examples): no request makes the server answer 5xx."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from spellbook.server.app import build_services, create_app
from spellbook.settings import Settings

# Built at import (schemathesis needs the schema to parametrize); in its own home, no worker running:
# accepted jobs just queue. The endpoints that wait for a job (A1111 txt2img/img2img) or stream (SSE) are
# covered by test_server.py instead.
_HOME = Path(tempfile.mkdtemp(prefix="spellbook-fuzz-"))
# schemathesis' ASGI client names the server "testserver": allowed, as an operator would add a LAN name.
_SETTINGS = Settings.from_env(env={}, home=str(_HOME), rate_limit=0, allowed_hosts="testserver")
_APP = create_app(_SETTINGS, services=build_services(_SETTINGS, start_worker=False))
schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)
schema = schema.exclude(path_regex=r"^/sdapi/v1/(txt2img|img2img)$").exclude(path_regex=r"/events$")


@pytest.fixture(autouse=True, scope="module")
def _quiet_hub():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="module")
def _remove_home():
    """The home is made at import (outside pytest's tmp_path): remove it once the module's tests ran."""
    yield
    shutil.rmtree(_HOME, ignore_errors=True)


@schema.parametrize()
@settings(
    max_examples=int(os.environ.get("SPELLBOOK_FUZZ_EXAMPLES", "15")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_makes_the_server_fail(case):
    response = case.call()
    declared = {int(code) for code in case.operation.definition.raw.get("responses", {}) if code.isdigit()}
    # A 5xx is a failure unless the operation declares it (interrogate: 501, no captioning model installed).
    assert response.status_code < 500 or response.status_code in declared, (
        f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:300]}"
    )
