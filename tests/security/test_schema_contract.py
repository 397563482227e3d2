"""What the schemathesis run relies on, checked in process (fast): the schema declares how callers authenticate,
the concept-name pattern it declares is the one the server applies, and what the fuzzer found stays fixed."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spellbook.concepts.library import check_concept_name
from spellbook.errors import UserError
from spellbook.server.concept_routes import NAME_PATTERN


@pytest.mark.parametrize("auth", ["on", "off"])
def test_operations_that_take_a_caller_declare_token_and_session(make_client, auth):
    client, _ = make_client(start_worker=False, auth=auth)
    schema = client.get("/openapi.json").json()
    assert set(schema["components"]["securitySchemes"]) == {"token", "session"}
    expected = [{"token": []}, {"session": []}] if auth == "on" else [{}, {"token": []}, {"session": []}]
    assert schema["paths"]["/api/v1/jobs"]["post"]["security"] == expected
    assert schema["paths"]["/sdapi/v1/options"]["get"]["security"] == expected
    # Open to anyone: liveness, and signing in and out.
    for path, method in (("/api/v1/health", "get"), ("/api/v1/session", "post"), ("/api/v1/session", "delete")):
        assert "security" not in schema["paths"][path][method], (method, path)


def _accepted(name: str) -> bool:
    try:
        check_concept_name(name)
    except UserError:
        return False
    return True


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="ab9Z_.+-<> \t\n\x1c/é", min_size=1, max_size=10))
def test_the_declared_concept_name_pattern_is_the_check_the_server_applies(name):
    assert _accepted(name) == bool(re.search(NAME_PATTERN, name)), repr(name)


def test_a_concept_name_with_a_newline_is_refused():
    """`$` matched before a trailing newline: '<ab\\n>' was accepted, and became a file name."""
    for name in ("<ab\n>", "<ab\n\n>", "<a..b>"):
        assert not _accepted(name), repr(name)
    assert check_concept_name(" <ab> ") == "ab"


def test_ignored_options_with_any_name_give_a_legal_header(make_client):
    """Option names are echoed in X-Spellbook-Ignored-Options: a non-latin-1 name was a 500, a control character
    or a space at either end made the server drop the connection."""
    client, _ = make_client(start_worker=False)
    response = client.post("/sdapi/v1/options", json={" ": None, "\U000efcf3x": 1, "a\x0bb ": 2})
    assert response.status_code == 200
    header = response.headers["x-spellbook-ignored-options"]
    assert header == header.strip() and all(" " <= c <= "~" for c in header), header
