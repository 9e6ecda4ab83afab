"""Per-user tokens: what a browser holds instead of an API key.

A token is `base64url(payload) + "." + base64url(HMAC-SHA256(USER_TOKEN_SECRET,
base64url(payload)))`, without `=` padding, where the payload is the JSON object
`{"sub": <user id>, "exp": <unix seconds>}`. The application's backend mints them with
the same few lines (README, "Tokens for browsers"), or asks POST /token.

No JWT library: one algorithm, fixed by the service, so there is no header that could
name another (`alg: none`, an RSA key taken for an HMAC secret). The signature covers
the payload's base64 text exactly as sent, so the JSON's spacing or key order is the
minter's business, and the signature is compared as the canonical base64 of the HMAC,
so no second spelling of it passes. A token is checked for its form and length before
any decoding, and for its signature before its payload is read.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from dataclasses import dataclass

# A real token is about 105 characters; anything much longer is refused unread.
TOKEN_MAX_CHARS = 256
# POST /token's default and largest lifetime; a token whose expiry is further away than
# MAX_TTL_SECONDS is refused however it was minted (a backend's mistake, or a secret's
# misuse, must not make a token that outlives a day).
DEFAULT_TTL_SECONDS = 3600
MAX_TTL_SECONDS = 24 * 3600
MIN_TTL_SECONDS = 60
# USER_TOKEN_SECRET's least length: as many bytes as SHA-256 gives, so that the secret
# is never the weak part.
SECRET_MIN_BYTES = 32

_PART = r"[A-Za-z0-9_-]+"
_TOKEN_RE = re.compile(rf"({_PART})\.({_PART})")
_USER_RE = re.compile(r"[0-9a-f]{24}")


class InvalidToken(Exception):
    """Not a token of this service: malformed, forged, or signed with another secret."""


class ExpiredToken(InvalidToken):
    """A genuine token past its expiry."""


@dataclass(frozen=True)
class Claims:
    user_id: str
    expires_at: int  # unix seconds


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signature(secret: bytes, payload: str) -> str:
    return _b64(hmac.new(secret, payload.encode("ascii"), hashlib.sha256).digest())


def mint(secret: bytes, user_id: str, expires_at: int) -> str:
    """The token of `user_id` (24 hexadecimal characters) valid until `expires_at`."""
    if not _USER_RE.fullmatch(user_id.lower()):
        raise ValueError("user_id must be 24 hexadecimal characters")
    claims = {"sub": user_id.lower(), "exp": int(expires_at)}
    payload = _b64(json.dumps(claims, separators=(",", ":")).encode("ascii"))
    return f"{payload}.{_signature(secret, payload)}"


def verify(secret: bytes, token: str, now: float) -> Claims:
    """The claims of a genuine, unexpired token.

    :raise ExpiredToken: genuine, but `exp` has passed.
    :raise InvalidToken: anything else that is not a token this secret signed, or one
        that expires more than MAX_TTL_SECONDS after `now`.
    """
    matched = _TOKEN_RE.fullmatch(token) if len(token) <= TOKEN_MAX_CHARS else None
    if matched is None:
        raise InvalidToken("not a token")
    payload, given = matched.groups()
    if not hmac.compare_digest(_signature(secret, payload), given):
        raise InvalidToken("bad signature")
    # Signed by the secret's holder: what follows guards against their mistakes.
    try:
        claims = json.loads(_unb64(payload))
    except ValueError:
        raise InvalidToken("the payload is not JSON") from None
    if not isinstance(claims, dict):
        raise InvalidToken("the payload is not an object")
    user_id, expires_at = claims.get("sub"), claims.get("exp")
    if not isinstance(user_id, str) or not _USER_RE.fullmatch(user_id):
        raise InvalidToken("sub is not a user id in lower-case hexadecimal")
    if type(expires_at) is not int:  # not a bool, not a float
        raise InvalidToken("exp is not a whole number of seconds")
    if expires_at <= now:
        raise ExpiredToken("expired")
    if expires_at > now + MAX_TTL_SECONDS:
        raise InvalidToken("expires more than a day from now")
    return Claims(user_id, expires_at)
