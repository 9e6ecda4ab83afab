"""Unsubscribe tokens (unsubscribe.py): what they name, and every way to tamper with one."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from bson import ObjectId

from notification_service.errors import InvalidUnsubscribeToken
from notification_service.unsubscribe import TOKEN_MAX_CHARS, make_token, read_token

SECRET = b"unsubscribe-secret-of-at-least-32-bytes!"
USER = "6756b2f1a4c3e0d9b8f71234"
OTHER_USER = "6756b2f1a4c3e0d9b8f79999"


def refused(token: str, secret: bytes = SECRET) -> bool:
    try:
        read_token(secret, token)
    except InvalidUnsubscribeToken as exc:
        assert exc.status == 403 and exc.code == "invalid_unsubscribe_token"
        return True
    return False


def test_a_token_names_its_user_and_key() -> None:
    assert read_token(SECRET, make_token(SECRET, USER, "new_post")) == (USER, "new_post")


def test_a_token_is_url_safe_ascii_and_stable() -> None:
    token = make_token(SECRET, USER.upper(), "new_post")
    assert token == make_token(SECRET, USER, "new_post")  # the id's case does not matter
    assert token.isascii() and all(c.isalnum() or c in "._-" for c in token)
    assert len(token) <= TOKEN_MAX_CHARS


def test_a_token_signed_with_another_secret_is_refused() -> None:
    assert refused(make_token(b"another-secret-of-at-least-32-bytes!!", USER, "new_post"))


def test_a_forged_signature_is_refused() -> None:
    forged = base64.urlsafe_b64encode(bytes(32)).rstrip(b"=").decode()
    assert refused(f"{USER}.new_post.{forged}")


def test_swapping_the_user_is_refused() -> None:
    signature = make_token(SECRET, USER, "new_post").rsplit(".", 1)[1]
    assert refused(f"{OTHER_USER}.new_post.{signature}")


def test_swapping_the_key_is_refused() -> None:
    signature = make_token(SECRET, USER, "new_post").rsplit(".", 1)[1]
    assert refused(f"{USER}.new_message.{signature}")


def test_a_signature_moved_from_another_token_is_refused() -> None:
    theirs = make_token(SECRET, OTHER_USER, "new_message").rsplit(".", 1)[1]
    assert refused(f"{USER}.new_post.{theirs}")


def test_every_single_character_change_is_refused() -> None:
    token = make_token(SECRET, USER, "new_post")
    for i, char in enumerate(token):
        for other in {"a", "A", "0", "_", "-", ".", "f"} - {char}:
            assert refused(token[:i] + other + token[i + 1 :]), (i, other)


def test_the_other_base64_spelling_of_the_signature_is_refused() -> None:
    # 32 bytes take 43 characters: the last one carries 2 unused bits, which a lax
    # decoder would ignore. Only the canonical spelling passes.
    token = make_token(SECRET, USER, "new_post")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(token[-1])
    assert refused(token[:-1] + alphabet[last ^ 1])


@pytest.mark.parametrize(
    "token",
    [
        "",
        ".",
        "..",
        f"{USER}.new_post",
        f"{USER}..{'A' * 43}",
        f"{USER[:-1]}.new_post.{'A' * 43}",
        f"{USER.upper()}.new_post.{'A' * 43}",
        f"{USER}.New_post.{'A' * 43}",
        f"{USER}.new_post.{'A' * 42}",
        f"{USER}.new_post.{'A' * 44}",
        f"{USER}.new_post.{'A' * 43}=",
        f"{USER}.new.post.{'A' * 43}",
        f"{USER}.new_post.{'A' * 43}\n",
        f" {USER}.new_post.{'A' * 43}",
    ],
)
def test_malformed_tokens_are_refused(token: str) -> None:
    assert refused(token)


def test_a_truncated_token_is_refused() -> None:
    token = make_token(SECRET, USER, "new_post")
    for end in range(len(token)):
        assert refused(token[:end])


def test_non_ascii_lookalikes_are_refused() -> None:
    token = make_token(SECRET, USER, "new_post")
    # Fullwidth digits and letters match \\w and str.isdigit(); the token's rule is ASCII.
    assert refused(token.replace("6", "\uff16", 1))
    assert refused(token.replace("e", "\u0435", 1))  # Cyrillic e
    assert refused(token + "\u200b")


def test_a_huge_token_is_refused_unread() -> None:
    assert refused("A" * 1_000_000)
    genuine = make_token(SECRET, USER, "k" * 64)
    assert read_token(SECRET, genuine) == (USER, "k" * 64)
    assert refused(genuine + "A")


def test_the_signature_covers_the_purpose_user_and_key_unambiguously() -> None:
    # The signed text is the documented one: a holder of the secret can mint a link in
    # another language the same way.
    signed = b"notification-service unsubscribe v1\n" + USER.encode() + b"\nnew_post"
    digest = hmac.new(SECRET, signed, hashlib.sha256).digest()
    expected = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    assert make_token(SECRET, USER, "new_post") == f"{USER}.new_post.{expected}"


@pytest.mark.parametrize(
    ("user_id", "key"),
    [("not-an-id", "new_post"), (USER, "New"), (USER, "a.b"), (USER, ""), (USER, "k" * 65)],
)
def test_a_token_is_only_made_for_a_user_id_and_a_key_name(user_id: str, key: str) -> None:
    with pytest.raises(ValueError):
        make_token(SECRET, user_id, key)


def test_tokens_of_different_users_and_keys_differ() -> None:
    users = [str(ObjectId()) for _ in range(5)]
    tokens = {make_token(SECRET, u, k) for u in users for k in ("new_post", "new_message")}
    assert len(tokens) == 10
