"""Sign in with a user name and password (/api/v1/session), sign out, and the paged credits ledger."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from spellbook.server.app import build_services, create_app
from spellbook.server.security import SIGNIN_PER_MINUTE
from spellbook.settings import Settings
from spellbook.store.accounts import Accounts
from spellbook.store.db import Database

PASSWORD = "correct horse battery"


@pytest.fixture
def accounts(home) -> Accounts:
    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("alice", password=PASSWORD)
    accounts.grant("alice", 30, note="welcome")
    accounts.add_user("tokens-only")  # no password: signs in with tokens only
    return accounts


@pytest.fixture
def make_client(home):
    """A TestClient over an auth-on app without a worker (nothing here runs jobs)."""
    clients = []

    def make(base_url: str = "http://127.0.0.1", **settings):
        s = Settings.from_env(auth="on", **settings)
        client = TestClient(create_app(s, services=build_services(s, start_worker=False)), base_url=base_url)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def sign_in(client, username="alice", password=PASSWORD, **kwargs):
    return client.post("/api/v1/session", json={"username": username, "password": password}, **kwargs)


def test_a_password_sign_in_sets_an_http_only_strict_cookie_and_sign_out_revokes_it(make_client, accounts):
    client = make_client()
    assert client.get("/api/v1/me").status_code == 401
    response = sign_in(client)
    assert response.status_code == 200 and response.json() == {"user": "alice", "role": "user"}
    cookie = response.headers["set-cookie"]
    assert cookie.startswith("spellbook_token=sb_") and "; HttpOnly" in cookie and "; Path=/" in cookie
    assert "samesite=strict" in cookie.lower() and "secure" not in cookie.lower()  # plain http: not Secure
    me = client.get("/api/v1/me").json()  # the cookie alone signs the client in
    assert (me["user"], me["balance"], me["ledger"][0]["note"]) == ("alice", 30, "welcome")
    token = client.cookies["spellbook_token"]
    assert [t["name"] for t in accounts.tokens("alice")] == ["web session"]

    signed_out = client.delete("/api/v1/session")
    assert signed_out.status_code == 204 and "Max-Age=0" in signed_out.headers["set-cookie"]  # cleared
    assert "spellbook_token" not in client.cookies
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {token}"}).status_code == 401  # revoked


def test_over_https_the_cookie_is_secure(make_client, accounts):
    client = make_client(base_url="https://127.0.0.1")
    cookie = sign_in(client).headers["set-cookie"]
    assert "; Secure" in cookie and "; HttpOnly" in cookie


def test_a_wrong_user_and_a_wrong_password_get_the_same_401(make_client, accounts):
    client = make_client()
    answers = [sign_in(client, password="wrong password"), sign_in(client, username="mallory")]
    answers.append(sign_in(client, username="tokens-only", password="anything"))
    assert {a.status_code for a in answers} == {401}
    assert answers[0].json() == answers[1].json() == answers[2].json()
    assert answers[0].json()["error"]["message"] == "wrong user name or password"
    assert not any("set-cookie" in a.headers for a in answers)


def test_password_guessing_is_rate_limited(make_client, accounts):
    client = make_client()
    for attempt in range(SIGNIN_PER_MINUTE):
        assert sign_in(client, password=f"guess {attempt}").status_code == 401
    limited = sign_in(client)  # even the right password waits now
    assert limited.status_code == 429 and "sign-in attempts" in limited.json()["error"]["message"]


def test_sign_in_and_out_from_another_site_are_refused(make_client, accounts):
    client = make_client()
    evil = {"origin": "https://evil.example"}
    assert sign_in(client, headers=evil).status_code == 403
    assert "spellbook_token" not in client.cookies
    assert sign_in(client, headers={"origin": "http://127.0.0.1"}).status_code == 200
    assert client.delete("/api/v1/session", headers=evil).status_code == 403
    assert client.get("/api/v1/me").status_code == 200  # still signed in


def test_signing_out_forgets_a_pasted_api_token_without_revoking_it(make_client, accounts):
    client = make_client()
    api_token = accounts.create_token("alice", "laptop")
    client.cookies.set("spellbook_token", api_token)
    assert client.get("/api/v1/me").json()["user"] == "alice"
    signed_out = client.delete("/api/v1/session")
    assert signed_out.status_code == 204 and "Max-Age=0" in signed_out.headers["set-cookie"]
    assert client.get("/api/v1/me", headers={"authorization": f"Bearer {api_token}"}).status_code == 200


def test_the_ledger_pages_back_from_the_newest_row(make_client, accounts):
    for i in range(1, 5):
        accounts.grant("alice", i, note=f"grant {i}")
    client = make_client()
    sign_in(client)
    notes, before, pages = [], None, 0
    while True:
        params = {"limit": 2} | ({"before": before} if before else {})
        page = client.get("/api/v1/me/ledger", params=params).json()
        notes.append([row["note"] for row in page["entries"]])
        before, pages = page["next_before"], pages + 1
        if before is None:
            break
    assert notes == [["grant 4", "grant 3"], ["grant 2", "grant 1"], ["welcome"]]
    assert client.get("/api/v1/me/ledger", params={"limit": 0}).status_code == 400


def test_wrong_basic_passwords_are_limited_like_sign_ins(make_client, home):
    import base64

    accounts = Accounts(Database(Settings.from_env().db_path))
    accounts.add_user("alice")
    accounts.set_password("alice", "correct horse battery")

    def basic(password: str) -> dict[str, str]:
        return {"authorization": "Basic " + base64.b64encode(f"alice:{password}".encode()).decode()}

    client = make_client()  # auth on
    for _ in range(3):  # the right password, as A1111 clients send it with every request: never limited
        assert client.get("/sdapi/v1/options", headers=basic("correct horse battery")).status_code == 200
    codes = [client.get("/sdapi/v1/options", headers=basic(f"guess {i}")).status_code for i in range(SIGNIN_PER_MINUTE)]
    assert codes == [401] * SIGNIN_PER_MINUTE
    assert client.get("/sdapi/v1/options", headers=basic("guess again")).status_code == 429
    assert client.get("/sdapi/v1/options", headers=basic("correct horse battery")).status_code == 429  # for now
