"""One-click unsubscribe links (RFC 8058): a token that names one user and one key.

A token is `<user id>.<key>.<signature>`, where the signature is the unpadded base64url
of HMAC-SHA256(UNSUBSCRIBE_SECRET, "notification-service unsubscribe v1\\n<user id>\\n<key>").
The user id is 24 lower-case hexadecimal characters and a key matches keys.KEY_NAME, so
neither holds a `.` or a line break: the token splits one way only, and the signed text
names exactly one (user, key) pair. Changing either part, or moving a signature to
another pair, breaks the signature. The purpose line keeps these signatures apart from
any other use of the same secret.

No expiry: an email read a year later must still unsubscribe (RFC 8058 asks for links
that keep working), and the only power a token gives is turning one key's email off or
back on for its own user. A token is checked for its form and length before anything
else, and its signature is compared in constant time against the one canonical spelling.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import TYPE_CHECKING

from .errors import InvalidUnsubscribeToken

if TYPE_CHECKING:
    from .config import Config
    from .keys import KeyTable

_PURPOSE = b"notification-service unsubscribe v1"
_SIGNATURE_CHARS = 43  # 32 bytes of base64url without padding
_USER = r"[0-9a-f]{24}"
_KEY = r"[a-z][a-z0-9_]{0,63}"  # keys.KEY_NAME
_TOKEN_RE = re.compile(rf"({_USER})\.({_KEY})\.([A-Za-z0-9_-]{{{_SIGNATURE_CHARS}}})")
# The longest genuine token; anything longer is refused unread.
TOKEN_MAX_CHARS = 24 + 1 + 64 + 1 + _SIGNATURE_CHARS


def _signature(secret: bytes, user_id: str, key: str) -> str:
    message = b"\n".join([_PURPOSE, user_id.encode("ascii"), key.encode("ascii")])
    digest = hmac.new(secret, message, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def make_token(secret: bytes, user_id: str, key: str) -> str:
    """The token of (`user_id`, `key`).

    :raise ValueError: `user_id` is not 24 hexadecimal characters or `key` not a key name.
    """
    user_id = user_id.lower()
    if not re.fullmatch(_USER, user_id) or not re.fullmatch(_KEY, key):
        raise ValueError("an unsubscribe token needs a user id and a key name")
    return f"{user_id}.{key}.{_signature(secret, user_id, key)}"


def read_token(secret: bytes, token: str) -> tuple[str, str]:
    """The (user id, key) of a genuine token.

    :raise InvalidUnsubscribeToken: anything else.
    """
    matched = _TOKEN_RE.fullmatch(token) if len(token) <= TOKEN_MAX_CHARS else None
    if matched is None:
        raise InvalidUnsubscribeToken()
    user_id, key, given = matched.groups()
    # The regex took only ASCII; comparing the canonical spelling means no second
    # base64 spelling of the same bytes (other trailing bits) passes either.
    if not hmac.compare_digest(_signature(secret, user_id, key), given):
        raise InvalidUnsubscribeToken()  # one answer, whichever part is wrong
    return user_id, key


def unsubscribe_url(config: Config, user_id: str, key: str) -> str | None:
    """`{PUBLIC_URL}/unsubscribe/<token>` for an email of a non-mandatory key; None for a
    mandatory key, or when PUBLIC_URL or UNSUBSCRIBE_SECRET is not set (config.py
    requires both when any non-mandatory key emails)."""
    keys: KeyTable = config.keys
    if key not in keys or keys.mandatory(key):
        return None
    if config.public_url is None or config.unsubscribe_secret is None:
        return None
    secret = config.unsubscribe_secret.reveal().encode("utf-8")
    return f"{config.public_url}/unsubscribe/{make_token(secret, user_id, key)}"
