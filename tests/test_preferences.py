"""Preferences and one-click unsubscribe through the app (preferences.py,
preference_handler.py), against a real SecantusDB server."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
import requests
from bson import ObjectId
from conftest import MongoServer
from flask import Flask
from flask.testing import FlaskClient
from test_stream import a_user, serve
from werkzeug.test import TestResponse

from notification_service import tokens
from notification_service.config import Config, Secret
from notification_service.keys import KeySpec, KeyTable
from notification_service.unsubscribe import make_token, unsubscribe_url

SECRET = "unsubscribe-secret-of-at-least-32-bytes!"
PUBLIC_URL = "https://notify.example.com/n"
API_KEY = "preferences-test-api-key-0123"
TOKEN_SECRET = "user-token-secret-of-at-least-32-bytes!"
# Every kind of key: mandatory email, in-app only, both, email only.
KEYS = KeyTable(
    [
        KeySpec("registration", in_app=False, email="always", mandatory=True),
        KeySpec("new_post", in_app=True, email="never"),
        KeySpec("new_comment", in_app=True, email="always"),
        KeySpec("weekly", in_app=False, email="always"),
        KeySpec("security", in_app=True, email="always", mandatory=True),
    ]
)
ALL_ON = {
    "registration": {"email": True, "mandatory": True},
    "new_post": {"in_app": True, "mandatory": False},
    "new_comment": {"in_app": True, "email": True, "mandatory": False},
    "weekly": {"email": True, "mandatory": False},
    "security": {"in_app": True, "email": True, "mandatory": True},
}
ONE_CLICK = {"List-Unsubscribe": "One-Click"}


@pytest.fixture
def prefs_config(make_config: Callable[..., Config]) -> Config:
    return make_config(keys=KEYS, unsubscribe_secret=Secret(SECRET), public_url=PUBLIC_URL)


@pytest.fixture
def web(make_app: Callable[..., Flask], prefs_config: Config) -> FlaskClient:
    return make_app(prefs_config).test_client()


@pytest.fixture
def guarded(
    make_app: Callable[..., Flask], prefs_config: Config, make_config: Callable[..., Config]
) -> FlaskClient:
    """The app with API keys and user tokens required."""
    config = make_config(
        **{
            name: getattr(prefs_config, name)
            for name in ("keys", "unsubscribe_secret", "public_url")
        },
        api_keys=(Secret(API_KEY),),
        user_token_key=Secret(TOKEN_SECRET),
    )
    return make_app(config).test_client()


def link(user_id: str, key: str, secret: str = SECRET) -> str:
    """The path of the user's unsubscribe link for `key`."""
    return f"/unsubscribe/{make_token(secret.encode(), user_id, key)}"


def data(response: TestResponse) -> Any:
    assert response.status_code == 200, response.get_json()
    return response.get_json()["data"]


def error(response: TestResponse, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.get_data(as_text=True)[:500]
    body: dict[str, Any] = response.get_json()["error"]
    return body


def stored(db: Any, config: Config, user_id: str) -> dict[str, Any] | None:
    doc: dict[str, Any] | None = db[config.users_collection].find_one({"_id": ObjectId(user_id)})
    return doc


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


# --- GET and PUT /preferences -----------------------------------------------------------


def test_get_lists_every_key_with_only_the_channels_it_uses(web: FlaskClient, user_id: str) -> None:
    response = web.get(f"/preferences?user_id={user_id}")
    assert response.get_json() == {"success": True, "data": {"keys": ALL_ON}}
    assert list(data(response)["keys"]) == list(KEYS.names)  # the table's order
    # Each key's channels first, as the issue writes them, then `mandatory`.
    assert [list(entry) for entry in data(response)["keys"].values()] == [
        list(entry) for entry in ALL_ON.values()
    ]


def test_put_is_partial_keeps_the_other_settings_and_answers_like_get(
    web: FlaskClient, user_id: str
) -> None:
    first = web.put(
        "/preferences", json={"user_id": user_id, "keys": {"new_comment": {"email": False}}}
    )
    second = web.put(
        "/preferences",
        json={"user_id": user_id, "keys": {"new_comment": {"in_app": False}, "weekly": {}}},
    )
    expected = {**ALL_ON, "new_comment": {"in_app": False, "email": False, "mandatory": False}}
    assert data(first)["keys"]["new_comment"]["email"] is False
    assert data(second) == {"keys": expected}
    assert data(web.get(f"/preferences?user_id={user_id}")) == {"keys": expected}
    back_on = web.put(
        "/preferences", json={"user_id": user_id, "keys": {"new_comment": {"email": True}}}
    )
    assert data(back_on)["keys"]["new_comment"] == {
        "in_app": False,
        "email": True,
        "mandatory": False,
    }


def test_put_stores_only_the_given_paths_beside_the_array_and_moves_the_version(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config
) -> None:
    web.post("/create", json={"user_id": user_id, "key": "new_post"})
    before = stored(db, prefs_config, user_id)
    assert before is not None
    web.put("/preferences", json={"user_id": user_id, "keys": {"weekly": {"email": False}}})
    after = stored(db, prefs_config, user_id)
    assert after is not None
    assert after["notifications_prefs"] == {"weekly": {"email": False}}
    assert after["notifications"] == before["notifications"]
    assert after["notifications_meta"]["version"] == before["notifications_meta"]["version"] + 1


def test_turning_off_a_mandatory_key_is_422_naming_it_and_writes_nothing(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config
) -> None:
    before = stored(db, prefs_config, user_id)
    refused = web.put(
        "/preferences",
        json={
            "user_id": user_id,
            "keys": {"weekly": {"email": False}, "security": {"in_app": True, "email": False}},
        },
    )
    body = error(refused, 422)
    assert body["code"] == "mandatory_key"
    assert "security" in body["message"]
    assert body["details"] == [{"field": "keys.security", "problem": "is mandatory"}]
    assert stored(db, prefs_config, user_id) == before  # weekly was not written either
    # Turning a mandatory key "on" is what it is already: accepted, nothing stored.
    kept_on = web.put(
        "/preferences", json={"user_id": user_id, "keys": {"security": {"email": True}}}
    )
    assert data(kept_on) == {"keys": ALL_ON}


@pytest.mark.parametrize(
    ("keys", "field"),
    [
        ({"no_such_key": {"email": False}}, "keys.no_such_key"),
        ({"new_post": {"email": False}}, "keys.new_post.email"),  # in-app only
        ({"weekly": {"in_app": False}}, "keys.weekly.in_app"),  # email only
    ],
)
def test_an_unknown_key_or_a_channel_the_key_does_not_use_is_422(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config, keys: Any, field: str
) -> None:
    before = stored(db, prefs_config, user_id)
    body = error(web.put("/preferences", json={"user_id": user_id, "keys": keys}), 422)
    assert body["code"] == "validation_failed"
    assert [d["field"] for d in body["details"]] == [field]
    assert stored(db, prefs_config, user_id) == before


@pytest.mark.parametrize(
    "body",
    [
        {"keys": {}},
        {"user_id": "nope", "keys": {}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234"},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"weekly": {"email": "false"}}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"weekly": {"email": 0}}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"weekly": {"mail": False}}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"weekly": False}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"$set": {"email": False}}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {"a.b": {"email": False}}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "keys": {}, "extra": 1},
    ],
)
def test_a_malformed_body_is_422(web: FlaskClient, body: Any) -> None:
    assert error(web.put("/preferences", json=body), 422)["code"] == "validation_failed"


def test_an_unknown_user_is_404(web: FlaskClient) -> None:
    missing = str(ObjectId())
    assert error(web.get(f"/preferences?user_id={missing}"), 404)["code"] == "user_not_found"
    put = web.put("/preferences", json={"user_id": missing, "keys": {"weekly": {"email": False}}})
    assert error(put, 404)["code"] == "user_not_found"


def test_a_prefs_field_the_application_uses_otherwise_is_409(
    web: FlaskClient, make_user: Callable[..., str]
) -> None:
    user = make_user(notifications_prefs=["not", "a", "document"])
    put = web.put("/preferences", json={"user_id": user, "keys": {"weekly": {"email": False}}})
    assert error(put, 409)["code"] == "user_document_invalid"
    assert data(web.get(f"/preferences?user_id={user}")) == {"keys": ALL_ON}


def test_the_api_key_or_the_users_own_token_opens_both(guarded: FlaskClient, user_id: str) -> None:
    own = bearer(tokens.mint(TOKEN_SECRET.encode(), user_id, int(time.time()) + 600))
    body = {"user_id": user_id, "keys": {"weekly": {"email": False}}}
    for auth in (bearer(API_KEY), own):
        assert data(guarded.get(f"/preferences?user_id={user_id}", headers=auth))
        assert data(guarded.put("/preferences", json=body, headers=auth))
    assert error(guarded.get(f"/preferences?user_id={user_id}"), 401)["code"] == "unauthorized"
    assert error(guarded.put("/preferences", json=body), 401)["code"] == "unauthorized"


def test_another_users_token_is_refused_as_on_the_inbox_routes_and_changes_nothing(
    guarded: FlaskClient, make_user: Callable[..., str], db: Any, prefs_config: Config
) -> None:
    mine, theirs = make_user(), make_user()
    auth = bearer(tokens.mint(TOKEN_SECRET.encode(), mine, int(time.time()) + 600))
    inbox = guarded.get(f"/list?user_id={theirs}", headers=auth)
    before = stored(db, prefs_config, theirs)
    attempts = [
        guarded.get(f"/preferences?user_id={theirs}", headers=auth),
        guarded.get(f"/preferences?user_id={theirs.upper()}", headers=auth),
        guarded.put(
            "/preferences",
            json={"user_id": theirs, "keys": {"weekly": {"email": False}}},
            headers=auth,
        ),
    ]
    for response in attempts:
        assert response.status_code == inbox.status_code == 403
        assert response.get_json()["error"] == inbox.get_json()["error"]
        assert response.get_json()["error"]["code"] == "token_for_another_user"
    assert stored(db, prefs_config, theirs) == before


# --- unsubscribe links ------------------------------------------------------------------


def test_unsubscribe_url_is_the_public_url_and_a_token_for_a_non_mandatory_key(
    prefs_config: Config, make_config: Callable[..., Config]
) -> None:
    user = "6756b2f1a4c3e0d9b8f71234"
    url = unsubscribe_url(prefs_config, user, "weekly")
    assert url == PUBLIC_URL + link(user, "weekly")
    assert unsubscribe_url(prefs_config, user, "security") is None  # mandatory
    assert unsubscribe_url(prefs_config, user, "registration") is None
    assert unsubscribe_url(make_config(keys=KEYS), user, "weekly") is None  # not configured


def test_the_link_of_unsubscribe_url_unsubscribes(
    web: FlaskClient, user_id: str, prefs_config: Config
) -> None:
    url = unsubscribe_url(prefs_config, user_id, "new_comment")
    assert url is not None
    path = urlsplit(url).path.removeprefix(urlsplit(PUBLIC_URL).path)  # a proxy strips /n
    assert web.post(path, data=ONE_CLICK).status_code == 200
    assert data(web.get(f"/preferences?user_id={user_id}"))["keys"]["new_comment"]["email"] is False


def test_a_get_shows_a_page_whose_button_posts_one_click_and_changes_nothing(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config
) -> None:
    before = stored(db, prefs_config, user_id)
    for _ in range(3):  # a scanner, a preview, the user
        page = web.get(link(user_id, "weekly"))
        assert page.status_code == 200
        assert page.mimetype == "text/html"
        html = page.get_data(as_text=True)
        assert '<form method="post">' in html
        assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in html
        assert "weekly" in html
    assert stored(db, prefs_config, user_id) == before


def test_the_pages_carry_the_headers_of_the_services_other_pages(
    web: FlaskClient, user_id: str
) -> None:
    for page in (
        web.get(link(user_id, "weekly")),
        web.post(link(user_id, "weekly"), data=ONE_CLICK),
    ):
        assert page.status_code == 200
        assert page.headers["X-Content-Type-Options"] == "nosniff"
        assert page.headers["X-Frame-Options"] == "DENY"
        policy = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "form-action 'self'" in policy and "script-src" not in policy
        assert page.headers["Cache-Control"] == "no-store"  # the URL is the credential
        assert page.headers["Referrer-Policy"] == "no-referrer"
        assert "Set-Cookie" not in page.headers


def test_every_answer_at_a_links_url_is_no_store_and_unframed_errors_too(
    guarded: FlaskClient, user_id: str
) -> None:
    # The URL is the credential, whatever the answer: a 405 is cacheable by default (RFC
    # 9111), and a cache keeps it under that URL; an error page shown in a browser is
    # framed or sends a Referer as any other would.
    good = link(user_id, "weekly")
    answers = {
        "page": guarded.get(good),
        "head": guarded.head(good),
        "one-click": guarded.post(good, data=ONE_CLICK),
        "options": guarded.options(good),
        "wrong method": guarded.put(good),
        "no action": guarded.post(good, data={}),
        "mandatory": guarded.post(link(user_id, "security"), data=ONE_CLICK),
        "tampered": guarded.post(good[:-2] + "AA", data=ONE_CLICK),
    }
    assert [r.status_code for r in answers.values()] == [200, 200, 200, 204, 405, 422, 422, 403]
    for name, response in answers.items():
        headers = response.headers
        assert headers.get("Cache-Control") == "no-store", name
        assert headers.get("Referrer-Policy") == "no-referrer", name
        assert headers.get("X-Frame-Options") == "DENY", name
        assert "frame-ancestors 'none'" in headers.get("Content-Security-Policy", ""), name
        assert headers.get("X-Content-Type-Options") == "nosniff", name


def test_a_one_click_post_turns_the_email_off_and_is_idempotent(
    guarded: FlaskClient, user_id: str, db: Any, prefs_config: Config
) -> None:
    # No key, no cookie: what a mail provider sends (RFC 8058 section 3.2).
    first = guarded.post(link(user_id, "new_comment"), data=ONE_CLICK)
    assert first.status_code == 200 and first.mimetype == "text/html"
    assert '<input type="hidden" name="undo" value="1">' in first.get_data(as_text=True)
    after_first = stored(db, prefs_config, user_id)
    assert after_first is not None
    assert after_first["notifications_prefs"] == {"new_comment": {"email": False}}
    again = guarded.post(link(user_id, "new_comment"), data=ONE_CLICK)
    assert again.status_code == 200
    assert stored(db, prefs_config, user_id) == after_first  # not even the version moved
    shown = data(guarded.get(f"/preferences?user_id={user_id}", headers=bearer(API_KEY)))
    assert shown["keys"]["new_comment"] == {"in_app": True, "email": False, "mandatory": False}


def test_a_multipart_one_click_post_works_too(web: FlaskClient, user_id: str) -> None:
    # RFC 8058 section 3.2: the POST SHOULD be multipart/form-data.
    response = web.post(link(user_id, "weekly"), data=ONE_CLICK, content_type="multipart/form-data")
    assert response.status_code == 200
    assert data(web.get(f"/preferences?user_id={user_id}"))["keys"]["weekly"]["email"] is False


def test_undo_turns_the_email_back_on(web: FlaskClient, user_id: str) -> None:
    web.post(link(user_id, "weekly"), data=ONE_CLICK)
    undone = web.post(link(user_id, "weekly"), data={"undo": "1"})
    assert undone.status_code == 200
    html = undone.get_data(as_text=True)
    assert '<input type="hidden" name="List-Unsubscribe" value="One-Click">' in html
    assert data(web.get(f"/preferences?user_id={user_id}"))["keys"]["weekly"]["email"] is True
    assert web.post(link(user_id, "weekly"), data={"undo": "1"}).status_code == 200


def test_an_unsubscribe_touches_only_its_own_user_and_key(
    web: FlaskClient, make_user: Callable[..., str]
) -> None:
    me, other = make_user(), make_user()
    web.post(link(me, "weekly"), data=ONE_CLICK)
    mine = data(web.get(f"/preferences?user_id={me}"))["keys"]
    assert mine == {**ALL_ON, "weekly": {"email": False, "mandatory": False}}
    assert data(web.get(f"/preferences?user_id={other}")) == {"keys": ALL_ON}


@pytest.mark.parametrize(
    "form",
    [
        {},
        {"List-Unsubscribe": "one-click"},
        {"List-Unsubscribe": "Yes"},
        {"undo": "true"},
        {"List-Unsubscribe": "One-Click", "undo": "1"},
    ],
)
def test_a_post_without_exactly_one_action_is_422_and_changes_nothing(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config, form: dict[str, str]
) -> None:
    before = stored(db, prefs_config, user_id)
    assert error(web.post(link(user_id, "weekly"), data=form), 422)["code"] == "validation_failed"
    assert stored(db, prefs_config, user_id) == before


def test_a_json_body_is_no_one_click(web: FlaskClient, user_id: str) -> None:
    response = web.post(link(user_id, "weekly"), json=ONE_CLICK)
    assert error(response, 422)["code"] == "validation_failed"


def test_a_repeated_field_is_422_and_other_fields_are_ignored(
    web: FlaskClient, user_id: str
) -> None:
    twice = web.post(
        link(user_id, "weekly"),
        data="List-Unsubscribe=One-Click&List-Unsubscribe=One-Click",
        content_type="application/x-www-form-urlencoded",
    )
    assert error(twice, 422)["details"][0]["problem"] == "is given more than once"
    extra = web.post(link(user_id, "weekly"), data={**ONE_CLICK, "provider": "x", "n": ["1", "2"]})
    assert extra.status_code == 200


def test_a_user_whose_document_is_gone_still_gets_200(
    web: FlaskClient, db: Any, prefs_config: Config
) -> None:
    gone = str(ObjectId())
    assert web.post(link(gone, "weekly"), data=ONE_CLICK).status_code == 200
    assert web.post(link(gone, "weekly"), data={"undo": "1"}).status_code == 200
    assert web.get(link(gone, "weekly")).status_code == 200
    assert db[prefs_config.users_collection].count_documents({}) == 0  # nothing created


def _tampered(user_id: str) -> list[str]:
    """Every way to get a link for a (user, key) the secret did not sign."""
    other = "6756b2f1a4c3e0d9b8f79999"
    genuine = make_token(SECRET.encode(), user_id, "weekly")
    signature = genuine.rsplit(".", 1)[1]
    flipped = signature[:10] + ("A" if signature[10] != "A" else "B") + signature[11:]
    return [
        make_token(b"another-secret-of-at-least-32-bytes!!", user_id, "weekly"),  # forged
        f"{user_id}.weekly.{flipped}",  # altered signature
        f"{other}.weekly.{signature}",  # another user
        f"{user_id}.new_comment.{signature}",  # another key
        genuine[:-1],  # truncated
        genuine[:30],
        genuine + "A",
        genuine.replace("weekly", "weekl\u00fd"),  # non-ASCII
        genuine[:-1] + "\u00c5",
        "A" * 100_000,  # huge
        "x",
    ]


def test_a_tampered_link_is_403_on_get_and_post_and_changes_nothing(
    guarded: FlaskClient, make_user: Callable[..., str], db: Any, prefs_config: Config
) -> None:
    user = make_user()
    other = make_user(_id=ObjectId("6756b2f1a4c3e0d9b8f79999"))
    before = [stored(db, prefs_config, u) for u in (user, other)]
    for token in _tampered(user):
        path = f"/unsubscribe/{quote(token, safe='')}"
        for response in (
            guarded.get(path),
            guarded.post(path, data=ONE_CLICK),
            guarded.post(path, data={"undo": "1"}),
        ):
            body = error(response, 403)
            assert body["code"] == "invalid_unsubscribe_token", token[:80]
            assert response.mimetype == "application/json"
    assert [stored(db, prefs_config, u) for u in (user, other)] == before


def test_without_a_secret_no_link_is_genuine(
    make_app: Callable[..., Flask], make_config: Callable[..., Config], user_id: str
) -> None:
    web = make_app(make_config()).test_client()
    response = web.post(link(user_id, "new_post"), data=ONE_CLICK)
    assert error(response, 403)["code"] == "invalid_unsubscribe_token"


def test_a_link_to_a_mandatory_key_cannot_turn_it_off(
    web: FlaskClient, user_id: str, db: Any, prefs_config: Config
) -> None:
    # Never minted by the service (unsubscribe_url gives None), but a key can become
    # mandatory after its emails went out.
    before = stored(db, prefs_config, user_id)
    page = web.get(link(user_id, "security"))
    assert page.status_code == 200 and "cannot be turned off" in page.get_data(as_text=True)
    assert "<form" not in page.get_data(as_text=True)
    body = error(web.post(link(user_id, "security"), data=ONE_CLICK), 422)
    assert body["code"] == "mandatory_key"
    assert stored(db, prefs_config, user_id) == before


def test_a_mail_providers_one_click_post_over_http_unsubscribes(
    mongo_server: MongoServer, tmp_path: Path
) -> None:
    """Through granian and the front (asgi.py), as a mail provider sends it: multipart,
    no key, no cookie, on a service that needs an API key for everything else."""
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text('[keys.weekly]\nin_app = false\nemail = "always"\n')
    server = serve(
        mongo_server,
        tmp_path / "log",
        API_KEYS=API_KEY,
        KEYS_FILE=str(keys_file),
        UNSUBSCRIBE_SECRET=SECRET,
        PUBLIC_URL=PUBLIC_URL,
    )
    try:
        user = a_user(mongo_server)
        url = f"http://127.0.0.1:{server.port}{link(user, 'weekly')}"
        page = requests.get(url, timeout=10)
        assert page.status_code == 200 and page.headers["X-Frame-Options"] == "DENY"
        key = {"Authorization": f"Bearer {API_KEY}"}
        status, body, _ = server.call("GET", f"/preferences?user_id={user}", headers=key)
        assert status == 200 and body["data"]["keys"]["weekly"]["email"] is True  # unchanged
        one_click = requests.post(
            url, files={"List-Unsubscribe": (None, "One-Click")}, timeout=10
        )  # multipart/form-data, as RFC 8058 section 3.2 recommends
        assert one_click.status_code == 200, one_click.text
        assert one_click.headers["Content-Type"].startswith("text/html")
        status, body, _ = server.call("GET", f"/preferences?user_id={user}", headers=key)
        assert status == 200 and body["data"]["keys"]["weekly"] == {
            "email": False,
            "mandatory": False,
        }
        forged_url = url.replace(".weekly.", ".weekly.A", 1)[:-1]  # the signature moved by one
        forged = requests.post(forged_url, data=ONE_CLICK, timeout=10)
        assert forged.status_code == 403
        assert forged.json()["error"]["code"] == "invalid_unsubscribe_token"
    finally:
        server.stop()


def test_the_routes_are_in_the_openapi_document(web: FlaskClient) -> None:
    paths = data_of_document(web)["paths"]
    assert set(paths["/preferences"]) == {"get", "put"}
    assert set(paths["/unsubscribe/{token}"]) == {"get", "post"}
    post = paths["/unsubscribe/{token}"]["post"]
    assert post["security"] == [] and paths["/unsubscribe/{token}"]["get"]["security"] == []
    assert set(post["requestBody"]["content"]) == {
        "application/x-www-form-urlencoded",
        "multipart/form-data",
    }
    assert set(post["responses"]["200"]["content"]) == {"text/html"}
    assert "invalid_unsubscribe_token" in post["responses"]["403"]["description"]
    put = paths["/preferences"]["put"]
    assert "mandatory_key" in put["responses"]["422"]["description"]


def data_of_document(web: FlaskClient) -> dict[str, Any]:
    response = web.get("/openapi.json")
    assert response.status_code == 200
    document: dict[str, Any] = response.get_json()
    return document
