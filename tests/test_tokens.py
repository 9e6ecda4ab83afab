"""Per-user tokens: the format (tokens.py), what a token opens and refuses (server.py and
api.py through the Flask app), POST /token, the README's recipe, and, through granian,
?token= on GET /stream and what reaches the logs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from bson import ObjectId
from conftest import MongoServer
from flask import Flask
from flask.testing import FlaskClient
from test_stream import Server, Stream, a_user, serve

from notification_service import tokens
from notification_service.config import Config, ConfigError, Secret

ROOT = Path(__file__).resolve().parent.parent
SECRET = "user-token-secret-of-at-least-32-bytes!"
KEY = "tokens-test-api-key-0123"
NEW_KEY = "tokens-test-api-key-4567"


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def mint(user_id: str, ttl: float = 600, secret: str = SECRET) -> str:
    return tokens.mint(secret.encode(), user_id, int(time.time() + ttl))


def signed(payload: bytes, secret: str = SECRET) -> str:
    """A token of any payload, as only the secret's holder could make it."""
    part = b64(payload)
    return f"{part}.{b64(hmac.new(secret.encode(), part.encode(), hashlib.sha256).digest())}"


def bearer(credential: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {credential}"}


# --- the format -------------------------------------------------------------------------


def test_a_minted_token_names_its_user_and_expiry() -> None:
    user = str(ObjectId())
    token = tokens.mint(SECRET.encode(), user.upper(), 2_000_000_000)
    claims = tokens.verify(SECRET.encode(), token, now=2_000_000_000 - 60)
    assert (claims.user_id, claims.expires_at) == (user, 2_000_000_000)
    payload = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert payload == {"sub": user, "exp": 2_000_000_000}  # readable, not secret: signed


def test_a_token_of_another_secret_or_with_a_changed_byte_is_refused() -> None:
    user = str(ObjectId())
    token = mint(user)
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(b"another-secret-of-at-least-32-bytes!!", token, time.time())
    payload, signature = token.split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    # Another user in a payload signed for the first one.
    other = b64(json.dumps({"sub": str(ObjectId()), "exp": int(time.time()) + 60}).encode())
    for forged in (f"{payload}.{flipped}", f"{other}.{signature}"):
        with pytest.raises(tokens.InvalidToken):
            tokens.verify(SECRET.encode(), forged, time.time())


def test_a_second_spelling_of_the_signature_is_refused() -> None:
    # 43 base64 characters carry 258 bits for a 256-bit HMAC: the last character has two
    # bits a lax decoder ignores. Only the canonical spelling passes.
    token = mint(str(ObjectId()))
    payload, signature = token.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(signature[-1])
    sibling = alphabet[last ^ 1]
    assert base64.urlsafe_b64decode(signature[:-1] + sibling + "=") == base64.urlsafe_b64decode(
        signature + "="
    )
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET.encode(), f"{payload}.{signature[:-1]}{sibling}", time.time())


def test_expired_is_told_apart_from_forged() -> None:
    token = tokens.mint(SECRET.encode(), str(ObjectId()), 1_000)
    with pytest.raises(tokens.ExpiredToken):
        tokens.verify(SECRET.encode(), token, now=1_000)  # expiry itself is past
    assert tokens.verify(SECRET.encode(), token, now=999).expires_at == 1_000


def test_a_token_that_expires_more_than_a_day_ahead_is_refused() -> None:
    user = str(ObjectId())
    now = time.time()
    assert tokens.verify(SECRET.encode(), mint(user, tokens.MAX_TTL_SECONDS - 5), now)
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET.encode(), mint(user, tokens.MAX_TTL_SECONDS + 5), now)


def _tricks() -> list[str]:
    user = str(ObjectId())
    good = mint(user)
    payload, signature = good.split(".")
    jwt_header = b64(b'{"alg":"none","typ":"JWT"}')
    return [
        "",
        ".",
        f"{payload}.",  # no signature ("alg": "none")
        f".{signature}",
        f"{payload}..{signature}",
        f"{jwt_header}.{payload}.",  # a JWT without signature
        f"{jwt_header}.{payload}.{signature}",  # the signature under a JWT header
        f"{payload}.{signature}.",
        f"{payload}.{signature}=",  # padding
        f"{payload}=.{signature}",
        f"{payload}.{signature} ",
        f" {payload}.{signature}",
        f"{payload}.{signature}\n",
        f"{payload}+.{signature}",  # base64, not base64url
        f"{payload}.{signature[:-1]}é",
        f"{payload}.{signature[:-1]}",  # one character short
        f"{payload}.{signature}{signature}",
        f"Bearer {good}",
        "x" * 100_000,  # huge: refused before any decoding
        f"{'a' * 10_000}.{signature}",
    ]


# Ids by position: the tricks are built from a random user and the current time, and
# every pytest-xdist worker must collect the same test names.
@pytest.mark.parametrize(
    "token", [pytest.param(t, id=f"trick{i:02d}") for i, t in enumerate(_tricks())]
)
def test_format_tricks_are_refused(token: str) -> None:
    started = time.perf_counter()
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET.encode(), token, time.time())
    assert time.perf_counter() - started < 0.01


@pytest.mark.parametrize(
    "payload",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b'"6756b2f1a4c3e0d9b8f71234"',
        b'{"exp": 4000000000}',
        b'{"sub": "6756B2F1A4C3E0D9B8F71234", "exp": 4000000000}',  # upper case
        b'{"sub": "6756b2f1a4c3e0d9b8f7123", "exp": 4000000000}',
        b'{"sub": 12, "exp": 4000000000}',
        b'{"sub": {"$ne": null}, "exp": 4000000000}',
        b'{"sub": "6756b2f1a4c3e0d9b8f71234"}',
        b'{"sub": "6756b2f1a4c3e0d9b8f71234", "exp": true}',
        b'{"sub": "6756b2f1a4c3e0d9b8f71234", "exp": 4000000000.5}',
        b'{"sub": "6756b2f1a4c3e0d9b8f71234", "exp": "4000000000"}',
        b'{"sub": "6756b2f1a4c3e0d9b8f71234", "exp": 1e400}',
    ],
)
def test_a_signed_payload_that_is_not_a_user_and_an_expiry_is_refused(payload: bytes) -> None:
    # Only the secret's holder can sign these: a backend's mistake must not open anything.
    with pytest.raises(tokens.InvalidToken):
        tokens.verify(SECRET.encode(), signed(payload), now=3_999_999_000)


def test_the_readme_recipe_mints_the_services_tokens() -> None:
    readme = (ROOT / "README.md").read_text()
    recipe = re.search(r"<!-- token recipe -->\n```python\n(.*?)```", readme, re.S)
    assert recipe is not None, "the README's token recipe is marked <!-- token recipe -->"
    namespace: dict[str, Any] = {}
    exec(recipe.group(1), namespace)
    user = str(ObjectId())
    token = namespace["user_token"](SECRET, user, 600)
    claims = tokens.verify(SECRET.encode(), token, time.time())
    assert claims.user_id == user and 590 <= claims.expires_at - time.time() <= 600
    assert token == tokens.mint(SECRET.encode(), user, claims.expires_at)


# --- the configuration ------------------------------------------------------------------


def test_a_secret_shorter_than_32_bytes_stops_the_start_without_being_echoed() -> None:
    short = "s3cr3t-" * 4  # 28 bytes
    with pytest.raises(ConfigError) as refused:
        Config.from_env({"USER_TOKEN_SECRET": short})
    assert refused.value.problems[0].startswith("USER_TOKEN_SECRET: must be at least 32 bytes")
    assert short not in str(refused.value) and "28" not in str(refused.value)
    # Bytes, not characters: 16 two-byte characters are enough.
    assert Config.from_env({"USER_TOKEN_SECRET": "é" * 16}).user_token_key is not None
    config = Config.from_env({"USER_TOKEN_SECRET": SECRET})
    assert SECRET not in repr(config) and SECRET not in str(config.user_token_key)


def test_check_config_refuses_a_short_secret(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "notification_service", "check-config"],
        # This tree's package, whichever one the interpreter has installed.
        env={"USER_TOKEN_SECRET": "too-short-a-secret", "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "USER_TOKEN_SECRET: must be at least 32 bytes" in result.stderr
    assert "too-short-a-secret" not in result.stderr + result.stdout


# --- what a token opens (the Flask app) --------------------------------------------------


@pytest.fixture
def make_client(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> Callable[..., FlaskClient]:
    def make(keys: tuple[str, ...] = (KEY,), secret: str | None = SECRET) -> FlaskClient:
        key = Secret(secret) if secret is not None else None
        return make_app(make_config(api_keys=keys, user_token_key=key)).test_client()

    return make


@pytest.fixture
def guarded(make_client: Callable[..., FlaskClient]) -> FlaskClient:
    return make_client()


def notify(client: FlaskClient, user_id: str, data: dict[str, Any] | None = None) -> str:
    created = client.post(
        "/create",
        json={"user_id": user_id, "key": "new_post", "data": data or {}},
        headers=bearer(KEY),
    )
    assert created.status_code == 201, created.get_json()
    notification_id: str = created.get_json()["data"]["notification_id"]
    return notification_id


def test_a_token_opens_every_inbox_route_of_its_own_user(
    guarded: FlaskClient, make_user: Callable[..., str]
) -> None:
    user = make_user()
    first, second, third = (notify(guarded, user) for _ in range(3))
    auth = bearer(mint(user))
    assert guarded.get(f"/list?user_id={user}", headers=auth).get_json()["data"]["elements"] == 3
    assert guarded.get(f"/count?user_id={user}", headers=auth).get_json()["data"]["new"] == 3
    read = guarded.post("/read", json={"user_id": user, "notification_id": third}, headers=auth)
    assert read.get_json()["data"] == {"elements": 3, "new": 2}
    read_all = guarded.post("/read-all", json={"user_id": user, "up_to": second}, headers=auth)
    assert read_all.get_json()["data"] == {"changed": 2, "elements": 3, "new": 0}
    deleted = guarded.post("/delete", json={"user_id": user, "notification_id": first},
                           headers=auth)  # fmt: skip
    assert deleted.get_json()["data"]["deleted"] == 1
    gone = guarded.post("/delete-all", json={"user_id": user}, headers=auth)
    assert gone.get_json()["data"] == {"deleted": 2, "elements": 0, "new": 0}
    # The stream's first events (a plain WSGI answer here; granian holds it below).
    stream = guarded.get(f"/stream?user_id={user}", headers=auth)
    assert stream.status_code == 200 and stream.mimetype == "text/event-stream"


def test_another_users_id_in_the_query_or_the_body_is_403_and_changes_nothing(
    guarded: FlaskClient, make_user: Callable[..., str], db: Any
) -> None:
    mine, theirs = make_user(), make_user()
    their_notification = notify(guarded, theirs)
    auth = bearer(mint(mine))
    nid = their_notification
    attempts = [
        guarded.get(f"/list?user_id={theirs}", headers=auth),
        guarded.get(f"/count?user_id={theirs}", headers=auth),
        guarded.get(f"/stream?user_id={theirs}", headers=auth),
        guarded.post(f"/read?user_id={theirs}&notification_id={nid}", headers=auth),
        guarded.post("/read", json={"user_id": theirs, "notification_id": nid}, headers=auth),
        guarded.post("/read-all", json={"user_id": theirs}, headers=auth),
        guarded.post(f"/read-all?user_id={theirs.upper()}", headers=auth),
        guarded.post("/delete", json={"user_id": theirs, "notification_id": nid}, headers=auth),
        guarded.post("/delete-all", json={"user_id": theirs}, headers=auth),
        guarded.post(f"/delete-all?user_id={theirs}", json={}, headers=auth),
    ]
    for response in attempts:
        assert response.status_code == 403, response.request.url
        error = response.get_json()["error"]
        assert error["code"] == "token_for_another_user"
        assert theirs not in json.dumps(error)
    # Its own id in the query and another's in the body: the request is refused whole.
    mixed = guarded.post(f"/read-all?user_id={mine}", json={"user_id": theirs}, headers=auth)
    assert mixed.status_code == 422
    # Nothing was read or deleted: the stored document is as the create left it.
    stored = db.users.find_one({"_id": ObjectId(theirs)})
    assert [n["is_new"] for n in stored["notifications"]] == [True]
    assert guarded.get(f"/count?user_id={theirs}", headers=bearer(KEY)).get_json()["data"] == {
        "elements": 1,
        "new": 1,
    }


def test_a_token_never_opens_create_email_token_or_an_undeclared_route(
    guarded: FlaskClient, user_id: str, db: Any
) -> None:
    auth = bearer(mint(user_id))
    attempts = [
        guarded.post("/create", json={"user_id": user_id, "key": "new_post"}, headers=auth),
        guarded.post("/email", json={"user_id": user_id, "subject": "s", "text": "t"},
                     headers=auth),
        guarded.get(f"/email/{ObjectId()}", headers=auth),
        guarded.post("/token", json={"user_id": user_id, "ttl_seconds": 86400}, headers=auth),
        guarded.get("/no-such-route", headers=auth),
    ]  # fmt: skip
    for response in attempts:
        assert response.status_code == 403, response.request.path
        assert response.get_json()["error"]["code"] == "token_not_accepted"
    assert db.users.find_one({"_id": ObjectId(user_id)}).get("notifications") is None
    assert db.email_outbox.count_documents({}) == 0


@pytest.mark.parametrize(
    "credential",
    [
        "forged",
        "expired",
        "other_secret",
        "empty",
    ],
)
def test_a_bad_token_is_401_on_every_inbox_route(
    guarded: FlaskClient, user_id: str, credential: str
) -> None:
    token = {
        "forged": mint(user_id)[:-3] + "AAA",
        "expired": tokens.mint(SECRET.encode(), user_id, int(time.time()) - 1),
        "other_secret": mint(user_id, secret="another-secret-of-at-least-32-bytes!!"),
        "empty": "",
    }[credential]
    for response in (
        guarded.get(f"/list?user_id={user_id}", headers=bearer(token)),
        guarded.get(f"/stream?user_id={user_id}", headers=bearer(token)),
        guarded.post("/read-all", json={"user_id": user_id}, headers=bearer(token)),
    ):
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == "Bearer"
        code = response.get_json()["error"]["code"]
        assert code == ("token_expired" if credential == "expired" else "unauthorized")


def test_token_in_the_query_is_refused_where_a_header_would_do(
    guarded: FlaskClient, user_id: str, db: Any
) -> None:
    notify(guarded, user_id)
    token = mint(user_id)
    for response in (
        guarded.get(f"/list?user_id={user_id}&token={token}"),
        guarded.post(f"/read-all?user_id={user_id}&token={token}"),
        guarded.post(f"/delete-all?user_id={user_id}&token={token}"),
        guarded.post(f"/create?token={token}", json={"user_id": user_id, "key": "new_post"}),
    ):
        assert response.status_code == 401, response.request.path
        assert "GET /stream only" in response.get_json()["error"]["message"]
    stored = db.users.find_one({"_id": ObjectId(user_id)})
    assert [n["is_new"] for n in stored["notifications"]] == [True]
    # On the stream it is read; two of them, or one beside a header, are refused.
    assert guarded.get(f"/stream?user_id={user_id}&token={token}").status_code == 200
    assert guarded.get(f"/stream?user_id={user_id}&token={token}&token={token}").status_code == 401
    both = guarded.get(f"/stream?user_id={user_id}&token={token}", headers=bearer(token))
    assert both.status_code == 401


def test_the_api_key_still_opens_everything_beside_tokens(
    guarded: FlaskClient, user_id: str
) -> None:
    notify(guarded, user_id)
    assert guarded.get(f"/list?user_id={user_id}", headers=bearer(KEY)).status_code == 200
    assert guarded.get(f"/stream?user_id={user_id}", headers=bearer(KEY)).status_code == 200
    assert guarded.get(f"/list?user_id={user_id}").status_code == 401


def test_an_api_key_is_never_taken_from_the_url(guarded: FlaskClient, user_id: str) -> None:
    # ?token= is for a user's token: a key there would sit in histories, proxy logs and
    # Referer headers, and it opens every user's notifications.
    notify(guarded, user_id)
    refused = guarded.get(f"/stream?user_id={user_id}&token={KEY}")
    assert refused.status_code == 401
    assert refused.get_json()["error"]["code"] == "unauthorized"


def test_rotating_the_api_keys_leaves_tokens_valid_and_another_secret_ends_them(
    make_client: Callable[..., FlaskClient], user_id: str
) -> None:
    token = mint(user_id)
    before = make_client(keys=(KEY,))
    assert before.get(f"/count?user_id={user_id}", headers=bearer(token)).status_code == 200
    after = make_client(keys=(NEW_KEY,))
    assert after.get(f"/count?user_id={user_id}", headers=bearer(token)).status_code == 200
    assert after.get(f"/count?user_id={user_id}", headers=bearer(KEY)).status_code == 401
    rotated = make_client(secret="a-brand-new-user-token-secret-0123456789")
    assert rotated.get(f"/count?user_id={user_id}", headers=bearer(token)).status_code == 401


def test_without_a_secret_no_token_is_accepted_and_none_is_minted(
    make_client: Callable[..., FlaskClient], user_id: str
) -> None:
    client = make_client(secret=None)
    response = client.get(f"/count?user_id={user_id}", headers=bearer(mint(user_id)))
    assert response.status_code == 401 and response.get_json()["error"]["code"] == "unauthorized"
    minted = client.post("/token", json={"user_id": user_id}, headers=bearer(KEY))
    assert minted.status_code == 501
    assert minted.get_json()["error"]["code"] == "tokens_not_configured"


def test_without_keys_a_token_still_keeps_to_its_own_user(
    make_client: Callable[..., FlaskClient], make_user: Callable[..., str]
) -> None:
    client = make_client(keys=())
    mine, theirs = make_user(), make_user()
    assert client.get(f"/count?user_id={theirs}").status_code == 200  # the service is open
    assert client.get(f"/count?user_id={mine}", headers=bearer(mint(mine))).status_code == 200
    refused = client.get(f"/count?user_id={theirs}", headers=bearer(mint(mine)))
    assert refused.status_code == 403
    # A credential that is sent is checked, even where none is needed.
    assert client.get(f"/count?user_id={mine}", headers=bearer("not-a-token")).status_code == 401


# --- POST /token ------------------------------------------------------------------------


def test_post_token_mints_a_token_for_key_holders(guarded: FlaskClient, user_id: str) -> None:
    before = int(time.time())
    minted = guarded.post("/token", json={"user_id": user_id.upper()}, headers=bearer(KEY))
    assert minted.status_code == 201
    data = minted.get_json()["data"]
    assert data["user_id"] == user_id
    assert before + 3600 <= data["expires_at"] <= int(time.time()) + 3600
    claims = tokens.verify(SECRET.encode(), data["token"], time.time())
    assert (claims.user_id, claims.expires_at) == (user_id, data["expires_at"])
    listed = guarded.get(f"/list?user_id={user_id}", headers=bearer(data["token"]))
    assert listed.status_code == 200
    short = guarded.post("/token", json={"user_id": user_id, "ttl_seconds": 60},
                         headers=bearer(KEY))  # fmt: skip
    assert short.get_json()["data"]["expires_at"] <= int(time.time()) + 60
    assert guarded.post("/token", json={"user_id": user_id}).status_code == 401


def test_post_token_takes_a_whole_lifetime_written_as_a_float(
    guarded: FlaskClient, user_id: str
) -> None:
    # JSON Schema's integer holds 120.0 too (the contract run sent it).
    minted = guarded.post("/token", json={"user_id": user_id, "ttl_seconds": 120.0},
                          headers=bearer(KEY))  # fmt: skip
    assert minted.status_code == 201
    assert minted.get_json()["data"]["expires_at"] <= int(time.time()) + 120


@pytest.mark.parametrize(
    "body",
    [
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": 59},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": 86401},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": "3600"},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": True},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": 3600.5},
        {"user_id": {"$ne": None}},
        {"user_id": "6756b2f1a4c3e0d9b8f71234", "sub": "6756b2f1a4c3e0d9b8f75678"},
        {},
    ],
)
def test_post_token_refuses_a_lifetime_out_of_bounds_or_a_bad_user(
    guarded: FlaskClient, body: dict[str, Any]
) -> None:
    response = guarded.post("/token", json=body, headers=bearer(KEY))
    assert response.status_code == 422
    assert response.get_json()["error"]["code"] == "validation_failed"


# --- through granian: ?token= on the stream, expiry, the logs ----------------------------


@pytest.fixture(scope="module")
def server(mongo_server: MongoServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # DEBUG: whatever granian or the service logs at any level is looked at below.
    log = tmp_path_factory.mktemp("tokens") / "log"
    running = serve(mongo_server, log, API_KEYS=KEY, USER_TOKEN_SECRET=SECRET, LOG_LEVEL="DEBUG")
    yield running
    running.stop()


def open_stream(
    server: Server, user: str, token: str | None = None, headers: dict[str, str] | None = None
) -> Stream:
    """GET /stream as EventSource sends it: the token, if any, in the query string."""
    return Stream(server, user if token is None else f"{user}&token={token}", headers)


def test_an_eventsource_opens_the_stream_with_token_in_the_query(
    server: Server, mongo_server: MongoServer
) -> None:
    user, other = a_user(mongo_server), a_user(mongo_server)
    stream = open_stream(server, user, mint(user))
    try:
        assert stream.status == 200
        assert stream.next()["event"] == "counts"
        made = server.call("POST", "/create", {"user_id": user, "key": "new_post"},
                           headers=bearer(KEY))[1]["data"]["notification_id"]  # fmt: skip
        assert stream.next()["id"] == made
    finally:
        stream.close()
    refused = open_stream(server, other, mint(user))
    assert refused.status == 403 and refused.error["error"]["code"] == "token_for_another_user"
    refused.close()


def test_a_stream_opened_with_a_token_ends_when_the_token_expires(
    server: Server, mongo_server: MongoServer
) -> None:
    user = a_user(mongo_server)
    token = tokens.mint(SECRET.encode(), user, int(time.time()) + 2)
    stream = open_stream(server, user, token)
    try:
        assert stream.status == 200
        stream.next()
        started = time.monotonic()
        while (event := stream.next(timeout=5, comments=True)) != {"end": True}:
            assert "comment" in event  # only heartbeats until then
        assert time.monotonic() - started < 3.5
    finally:
        stream.close()
    again = open_stream(server, user, token)
    assert again.status == 401 and again.error["error"]["code"] == "token_expired"
    again.close()
    # A key's stream has no such end.
    keyed = open_stream(server, user, headers=bearer(KEY))
    try:
        keyed.next()
        assert keyed.next(timeout=3, comments=True) == {"comment": "keep-alive"}
    finally:
        keyed.close()


def hit(server: Server, method: str, path: str, headers: dict[str, str] | None = None) -> int:
    """The status of one request, whatever its body."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def test_no_token_reaches_any_log_line(server: Server, mongo_server: MongoServer) -> None:
    user = a_user(mongo_server)
    token = mint(user)
    expired = tokens.mint(SECRET.encode(), user, int(time.time()) - 5)
    forged = token[:-4] + "AAAA"
    for credential in (token, expired, forged):
        hit(server, "GET", f"/list?user_id={user}", bearer(credential))
        hit(server, "GET", f"/list?user_id={user}&token={credential}")
        hit(server, "POST", f"/read-all?user_id={user}&token={credential}")
        hit(server, "GET", f"/inbox?user_id={user}&token={credential}")
        hit(server, "GET", f"/inbox?token={credential}&user_id=nope")
        hit(server, "GET", f"/nowhere?token={credential}")
        hit(server, "GET", f"/stream?user_id={user}&token={credential}&x=%ZZ")
        stream = open_stream(server, user, credential)
        if stream.status == 200:
            stream.next()
        stream.close()
    minted = server.call("POST", "/token", {"user_id": user}, headers=bearer(KEY))[1]
    server.call("GET", f"/count?user_id={user}", headers=bearer(minted["data"]["token"]))
    time.sleep(0.5)  # the stream's line is written when it ends
    text = server.log.read_text()
    assert "/stream" in text and "/inbox" in text  # the lines are there
    for secret in (token, expired, forged, minted["data"]["token"]):
        for part in secret.split("."):
            assert part not in text
    assert SECRET not in text and KEY not in text
