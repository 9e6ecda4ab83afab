"""Idempotent creates: the `Idempotency-Key` header of POST /create and POST /email.

A client that did not get an answer (a timeout, a dropped connection, a 503) sends the
same request again with the same key, and the service acts on it at most once:

- the same key and body again: the first answer (status and JSON body), with
  `Idempotent-Replay: true`;
- the same key with another body: 422 `idempotency_key_reused`;
- while the first request with the key still runs: 409 `idempotency_key_in_use`
  with `Retry-After`.

The key: 1 to 255 printable ASCII characters (0x21-0x7E, and spaces between them; HTTP
strips them at the ends anyway), given once. Anything else is a 422
`validation_failed` naming the `Idempotency-Key` field, and nothing is stored. A key
is scoped by route (`create <key>`, `email <key>`) and kept in MongoDB, never in
process memory, so it holds across processes and restarts, for
IDEMPOTENCY_TTL_HOURS (from its first use).

The body is compared by a fingerprint: SHA-256 of its canonical JSON (sorted keys,
no whitespace), so key order and spacing do not make two requests differ.

A request cut short (a crash, a 503 between two writes, a claim that timed out but
was applied by the database afterwards) leaves its key running; once its lease is
over a retry takes it over and runs again with the SAME ids (`request_ids()`), so the
domain's writes repeat idempotently instead of doubling. The lease never ends while
its holder can still write (`lease_seconds`): DB_TIMEOUT_MS and a second from the
claim, and a fan-out's own deadline on top. The 409 says in `Retry-After` how long
the lease has left. A 503 or a bug ends the lease at once, so
the retry does not wait. A 4xx wrote nothing, so its key is forgotten and a corrected
request with the same key runs afresh.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, ParamSpec

from flask import Response, g, jsonify, make_response, request
from flask.typing import ResponseReturnValue
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException

from . import outcomes
from .config import Config
from .errors import (
    ApiError,
    ErrorDetail,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    ValidationFailed,
)
from .storage.idempotency_store import KeyClaim, refs_of
from .storage.ids import IdBlock
from .storage.mongo_connector import DatabaseUnavailable, with_own_deadline
from .web import json_body, services

log = logging.getLogger(__name__)

P = ParamSpec("P")

HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replay"
MAX_KEY_LENGTH = 255
# Past its deadline a holder sends nothing more; this covers a write it sent just
# before, still on its way, and small clock differences between the hosts that write
# a lease and those that read it (they need NTP, as the dispatchers' leases do).
LEASE_MARGIN_SECONDS = 1.0
# Printable ASCII, spaces only between visible characters (so never only spaces).
_KEY_RE = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")


def fingerprint(body: Any) -> str:
    """SHA-256 (hex) of `body` as canonical JSON: insensitive to key order and spacing."""
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def key_digest(key: str) -> str:
    """What a log line says of a caller-chosen key: the start of its SHA-256, enough to
    match two lines, nothing of what the caller wrote."""
    return hashlib.sha256(key.encode("utf-8", "replace")).hexdigest()[:16]


def idempotency_key() -> str | None:
    """The request's Idempotency-Key, or None without the header.

    :raise ValidationFailed: the header is empty, too long, or not printable ASCII.
    """
    # A header sent twice reaches a WSGI app as one value, the two joined by ", ": it is
    # one key then, the same each time the client repeats it.
    key = request.headers.get(HEADER)
    if key is None:
        return None
    if not key.strip(" "):
        raise _bad_key("must not be empty or only spaces")
    if len(key) > MAX_KEY_LENGTH:
        raise _bad_key(f"must be at most {MAX_KEY_LENGTH} characters")
    if not _KEY_RE.fullmatch(key):
        raise _bad_key("must be printable ASCII (0x21-0x7E, with spaces only between them)")
    return key


def _bad_key(problem: str) -> ValidationFailed:
    detail: ErrorDetail = {"field": HEADER, "problem": problem}
    return ValidationFailed(details=[detail])


def lease_seconds(config: Config, body: dict[str, Any]) -> float:
    """How long, from its claim, a request holding a key may still write: its lease.

    Every database call of a request shares one deadline, DB_TIMEOUT_MS from its
    arrival (server.py), which came before the claim. A fan-out (`user_ids`) then
    opens a deadline of its own in the handler (notification_handler.create), once
    the claim has answered. Past the sum nothing of the request is sent; the margin
    covers what is still on its way. Its key's outcome (complete, forget, release) may
    be written later, but each is conditional on this very lease, so it never touches
    a successor's.

    As short as that, because a failed claim cannot be released: a claim that timed
    out may be applied by the database afterwards (frozen with the insert in hand),
    when the request has answered 503; a release sent meanwhile would time out as
    well (another DB_TIMEOUT_MS for the client), or arrive first and find nothing.
    Only the lease's length frees such a key, and the client's retry takes it over
    once the first attempt's deadline has passed.
    """
    own_deadline = config.fan_out_timeout_seconds if body.get("user_ids") is not None else 0.0
    return config.db_timeout_ms / 1000 + own_deadline + LEASE_MARGIN_SECONDS


def retry_after(lease_until: datetime | None, now: datetime) -> int:
    """Whole seconds until a key held until `lease_until` may be taken over; at least 1."""
    if lease_until is None:
        return 1
    return max(1, math.ceil((lease_until - now).total_seconds()))


def request_ids() -> tuple[IdBlock, bool]:
    """The ids this request writes, and whether it takes over an interrupted attempt.

    With an Idempotency-Key, the block comes from the key's record: the first attempt
    and every takeover of it share one seed, hence the same ids. Without one, a fresh
    block (the same one for every call within the request).
    """
    ids: tuple[IdBlock, bool] | None = g.get("idempotency_ids")
    if ids is None:
        ids = (IdBlock(), False)
        g.idempotency_ids = ids
    return ids


def idempotent(scope: str) -> Callable[[Callable[P, ResponseReturnValue]], Callable[P, Response]]:
    """Make a JSON-body POST view honour the Idempotency-Key header, keyed per `scope`."""

    def decorate(view: Callable[P, ResponseReturnValue]) -> Callable[P, Response]:
        @functools.wraps(view)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> Response:
            key = idempotency_key()
            if key is None:
                return make_response(view(*args, **kwargs))
            # Parsed first: a body that is not a JSON object is a 400 that claims nothing.
            body = json_body()
            svc = services()
            now = svc.clock()
            # A claim that fails (503) is not released: see lease_seconds.
            claim = svc.idempotency.claim(
                f"{scope} {key}", fingerprint(body), now, lease_seconds(svc.config, body)
            )
            if claim.outcome == "replay":
                response = jsonify(outcomes.unpack(claim.body, body, IdBlock(claim.seed)))
                response.status_code = claim.status
                response.headers[REPLAY_HEADER] = "true"
                return response
            if claim.outcome == "reused":
                raise IdempotencyKeyReused()
            if claim.outcome == "in_use":
                raise IdempotencyKeyInUse(retry_after(claim.lease_until, now))
            g.idempotency_ids = (IdBlock(claim.seed), claim.outcome == "taken_over")
            return _run(claim, lambda: make_response(view(*args, **kwargs)), body)

        return wrapper

    return decorate


def _run(claim: KeyClaim, view: Callable[[], Response], request_body: Any = None) -> Response:
    """Run the view holding `claim`, then record its outcome on the key (with whom it
    is about, `refs_of`, so that an erasure of a user finds it)."""
    svc = services()
    store = svc.idempotency
    # Read here: the writes about the key run outside the request's context, each with
    # a budget of its own (DB_TIMEOUT_MS). The request's deadline is usually spent when
    # it failed of a timeout; so the key is still released at once, and the client's
    # retry does not wait out the lease.
    now = svc.clock()
    budget = svc.config.db_timeout_ms / 1000

    def finish(what: str, write: Callable[[], bool]) -> None:
        # Best effort: the request's own answer (often an error) matters more. A key
        # left running is taken over by a retry once its lease ends.
        try:
            with_own_deadline(budget, write)
        except Exception:
            log.warning("could not %s an idempotency key", what, exc_info=True)

    try:
        response = view()
    except Exception as exc:
        if _client_error(exc):
            finish("forget", lambda: store.forget(claim))
        else:
            finish("release", lambda: store.release(claim, now))
        raise  # the original error, whatever became of the key
    status = response.status_code
    if 200 <= status < 300:
        try:
            body = response.get_json()
            refs = refs_of(request_body, body)
            # A fan-out's answer is kept as a few characters a user (outcomes.py).
            stored = outcomes.pack(body, request_body, IdBlock(claim.seed))
            with_own_deadline(budget, lambda: store.complete(claim, status, stored, refs))
        except DatabaseUnavailable:
            # The answer stands: its writes are done. The key stays running until its
            # lease ends; a retry then takes it over with the same seed, and the
            # domain's writes repeat without doubling.
            # The key is the caller's own text: the log names it by a digest only.
            log.warning(
                "could not record the answer of idempotency key sha256:%s", key_digest(claim.key)
            )
    elif 400 <= status < 500:
        finish("forget", lambda: store.forget(claim))
    else:
        finish("release", lambda: store.release(claim, now))
    return response


def _client_error(exc: Exception) -> bool:
    """Whether `exc` will be answered with a 4xx: the domain promises it wrote nothing."""
    if isinstance(exc, ApiError):
        return 400 <= exc.status < 500
    if isinstance(exc, HTTPException):
        return exc.code is not None and 400 <= exc.code < 500
    return isinstance(exc, ValidationError)  # server.py answers it with 422
