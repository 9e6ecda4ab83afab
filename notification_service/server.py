"""The app factory, the one JSON error shape, request ids, credentials, and each
request's database deadline.

Nothing is created at import: `create_app` builds the process's runtime (runtime.py)
unless it is given one.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from flask import Flask, Request, Response, current_app, g, jsonify, request
from pydantic import ValidationError
from werkzeug.exceptions import HTTPException, MethodNotAllowed

from . import logs, metrics, notification_handler, tokens
from .api import TOKEN_EXPIRES_AT, TOKEN_USER, Endpoint
from .config import Config, Secret
from .context import request_context, request_id
from .errors import (
    ApiError,
    ErrorDetail,
    TokenExpired,
    TokenNotAccepted,
    Unauthorized,
    Unavailable,
    error_body,
)
from .preference_handler import LINK_PREFIX, protect_link
from .runtime import Runtime, build_runtime
from .storage.mongo_connector import DatabaseUnavailable, deadline
from .web import STRICT_PARSING

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_content_type",
}


@dataclass(frozen=True)
class Guarantees:
    """What each request pays for beyond its route's work, all on by default. The
    benchmark's app factory turns each off alone to price it (bench/priced.py); a
    deployment has no reason to."""

    auth: bool = True  # API keys and user tokens, when configured
    request_log: bool = True  # request ids (X-Request-ID) and the access line
    metrics: bool = True  # the request counter and duration histogram
    deadline: bool = True  # one database budget for all of a request's calls
    strict_parsing: bool = True  # duplicate keys, NaN, repeated parameters refused


def create_app(
    config: Config | None = None,
    runtime: Runtime | None = None,
    *,
    guarantees: Guarantees = Guarantees(),
) -> Flask:
    """Build the WSGI app on `runtime`, or on one built from `config` (with
    DISPATCHER_THREADS > 0, that starts as many outbox dispatcher threads in this
    process). Given a runtime, its config is the app's, and its logging is the caller's."""
    if runtime is None:
        config = config or Config.from_env()
        logs.configure(config)
        runtime = build_runtime(config)
    config = runtime.config

    app = ServiceFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.max_body_bytes
    app.config[STRICT_PARSING] = guarantees.strict_parsing
    app.json.sort_keys = False  # type: ignore[attr-defined]  # keep the seed's field order
    app.extensions["notification_service"] = runtime
    app.register_blueprint(notification_handler.bp)
    _register_errors(app)
    # One hook of each kind: Flask pays a lookup and a call for each hook it runs.
    credentials = (
        _require_credentials(tuple(key.reveal() for key in config.api_keys), config.user_token_key)
        if guarantees.auth
        else None
    )
    app.before_request(_begin(credentials, config.db_timeout_ms / 1000, guarantees))
    app.after_request(_answered if guarantees.request_log else _noted)
    app.teardown_request(_end(guarantees))
    return app


def _begin(
    credentials: Callable[[], None] | None, db_seconds: float, guarantees: Guarantees
) -> Callable[[], None]:
    """Every request's start, in this order: an id for every answer, then the edge's
    refusal, then the credential, then the database deadline."""

    def begin() -> None:
        req, ctx = _current()
        edge = request_context(req.environ)
        ctx.edge = edge
        if edge is None:  # no front (a test client): the request starts here
            ctx.started = time.monotonic()
        if guarantees.request_log:
            ctx.request_id = request_id(req.headers.get("X-Request-ID"))
        if edge is not None and edge.edge_error is not None:
            # asgi.py refused the request (too large, too slow, cut short).
            raise edge.edge_error
        if credentials is not None:
            credentials()
        if guarantees.deadline:
            # Counted from when the edge had the whole request: a request that waited
            # for a free thread (the database slow, every thread waiting on it) has
            # less left, and answers 503 at once rather than DB_TIMEOUT_MS after it
            # finally started.
            left = db_seconds - (time.monotonic() - edge.received_at) if edge else db_seconds
            # Never 0: pymongo.timeout(0) would mean no limit at all.
            ctx.db_deadline = context = deadline(max(left, 0.001))
            context.__enter__()

    return begin


def _answered(response: Response) -> Response:
    ctx = cast(Any, g)._get_current_object()
    response.headers["X-Request-ID"] = ctx.get("request_id", "")
    return _noted(response)


def _noted(response: Response) -> Response:
    g.access_status = response.status_code
    # Every answer: no browser may guess another type than the one declared.
    response.headers["X-Content-Type-Options"] = "nosniff"
    if request.path.startswith(LINK_PREFIX):
        protect_link(response)  # its errors too: the URL is the credential
    return response


def _end(guarantees: Guarantees) -> Callable[[BaseException | None], None]:
    def end(exc: BaseException | None) -> None:
        req, ctx = _current()
        context = ctx.pop("db_deadline", None)
        if context is not None:
            context.__exit__(None, None, None)
        if guarantees.request_log or guarantees.metrics:
            _account(req, ctx, guarantees)

    return end


def runtime_of(app: Flask) -> Runtime:
    rt: Runtime = app.extensions["notification_service"]
    return rt


class ServiceFlask(Flask):
    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        """Every view and hook here is a plain function: Flask's own check (is it a
        coroutine function?) would run for each of them on every request."""
        return func

    def make_default_options_response(self) -> Response:
        """OPTIONS: 204 with `Allow` and no body (Flask's own answer is an empty text/html 200)."""
        response = super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


def _current() -> tuple[Request, Any]:
    """The request and `g` themselves, for the hooks that run on every request: each
    access through Flask's proxies costs about 2 µs, a dozen of them a request."""
    return cast(Any, request)._get_current_object(), cast(Any, g)._get_current_object()


# What opens each route, as declared (api.py): `open` routes (the probes, the
# documentation, the inbox page) are answered without a key; `key_or_token` ones also
# take a user token. A route not declared (a 404, one added outside the table) needs a key.
ROUTES: dict[str, Endpoint] = notification_handler.api.by_flask_endpoint()
OPEN_ENDPOINTS = notification_handler.api.open_endpoints()

_KEY_OR_TOKEN = "Send Authorization: Bearer <API key or user token>."


def _require_credentials(keys: tuple[str, ...], token_secret: Secret | None) -> Callable[[], None]:
    """The check of every request's credential: an API key opens every route; a user
    token (with USER_TOKEN_SECRET set) opens the routes declared `key_or_token`, for its
    own user only (api.py compares the request's user_id). Without keys or a secret
    the service is open, as it always was."""
    # Digests, so that every comparison is of equal lengths: compare_digest returns at
    # once on a length mismatch, which would tell a caller how long the keys are.
    digests = [hashlib.sha256(key.encode("ascii")).digest() for key in keys]
    secret = token_secret.reveal().encode("utf-8") if token_secret is not None else None

    def is_key(given: str) -> bool:
        candidate = hashlib.sha256(given.encode("utf-8", "replace")).digest()
        # Compare with every key, never stopping early: the time taken says nothing
        # about which key, or which prefix of one, came close.
        matched = False
        for digest in digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    def check() -> None:
        if (not digests and secret is None) or _is_open():
            return
        route = ROUTES.get(request.endpoint or "")
        takes_token = secret is not None and route is not None and route.auth == "key_or_token"
        refused = Unauthorized(_KEY_OR_TOKEN if takes_token else None)
        given, in_url = _credential(route, refused)
        if given is None:
            if digests:
                raise refused
            return  # no keys: the service is open; only a credential sent is checked
        # ?token= takes user tokens only: a key, which opens everything, must never be
        # taken from a URL (history, proxy logs, Referer).
        if not in_url and is_key(given):
            return
        if secret is None:
            raise refused
        now = runtime_of(current_app).services.clock().timestamp()
        try:
            claims = tokens.verify(secret, given, now)
        except tokens.ExpiredToken:
            raise TokenExpired() from None
        except tokens.InvalidToken:
            raise refused from None
        if not takes_token:
            raise TokenNotAccepted()
        setattr(g, TOKEN_USER, claims.user_id)
        setattr(g, TOKEN_EXPIRES_AT, float(claims.expires_at))

    return check


def _is_open() -> bool:
    """Whether the route needs no key; for a method its path does not take, whether the
    path's routes need none (their 405 is no secret, a 401 would say GET needs a key)."""
    error = request.routing_exception
    if isinstance(error, MethodNotAllowed) and error.valid_methods:
        adapter = current_app.url_map.bind_to_environ(request.environ)
        return all(adapter.match(method=m)[0] in OPEN_ENDPOINTS for m in error.valid_methods)
    return request.endpoint in OPEN_ENDPOINTS


def _credential(route: Endpoint | None, refused: Unauthorized) -> tuple[str | None, bool]:
    """The bearer credential of the request (None without one), and whether it came
    from the URL's `?token=`.

    :raise Unauthorized: `refused` for another scheme than Bearer; its own message for a
        `?token=` where it is not taken, or for two credentials.

    `?token=` is read only where the route declares it (GET /stream, as EventSource
    cannot send headers): elsewhere it is refused, never read. A URL ends up in browser
    history, proxy logs and Referer headers, and a POST whose URL carries the token
    could be made by any page that knows it, from any site.
    """
    header = request.headers.get("Authorization")
    queried = request.args.getlist("token")
    if queried:
        if route is None or not route.query_token:
            raise Unauthorized(
                "?token= is taken by GET /stream only: send Authorization: Bearer <token>."
            )
        if header is not None or len(queried) > 1:
            raise Unauthorized("Send one credential: a header or one ?token=, not both.")
        return queried[0], True
    if header is None:
        return None, False
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer":
        raise refused
    return given.strip(), False


def _account(req: Request, ctx: Any, guarantees: Guarantees) -> None:
    """The access line and the request metrics, once the response is made: no body,
    header or query string."""
    status = ctx.get("access_status", 500)
    edge = ctx.get("edge")
    if status == 200 and edge is not None and edge.held is not None:
        return  # a stream that starts: the hub writes its line when it ends
    now = time.monotonic()
    # From the edge's arrival (waiting for a thread included); without the front (a
    # test client), from when the app saw it.
    started = edge.received_at if edge is not None else ctx.get("started", now)
    rule = req.url_rule
    route = rule.rule if rule is not None else None
    if guarantees.request_log:
        logs.log_access(
            {
                "method": req.method,
                "route": route,
                "path": req.path,
                "status": status,
                "duration_ms": round((now - started) * 1000, 3),
                "request_id": ctx.get("request_id"),
            }
        )
    if guarantees.metrics:
        metrics.observe_request(req.method, route, status, now - started)


def _error(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> tuple[Response, int]:
    response = jsonify(error_body(code, message, details, **extra))
    response.headers.update(headers or {})
    return response, status


def _register_errors(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> tuple[Response, int]:
        return _error(exc.status, exc.code, exc.message, exc.details, exc.headers, **exc.extra)

    @app.errorhandler(DatabaseUnavailable)
    def database_unavailable(exc: DatabaseUnavailable) -> tuple[Response, int]:
        return api_error(Unavailable())

    @app.errorhandler(ValidationError)
    def validation_error(exc: ValidationError) -> tuple[Response, int]:
        details: list[ErrorDetail] = [
            {
                "field": ".".join(str(part) for part in err["loc"]) or "body",
                "problem": err["msg"].removeprefix("Value error, "),
            }
            for err in exc.errors(include_url=False)
        ]
        return _error(422, "validation_failed", "Some fields are not valid.", details)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> tuple[Response, int]:
        status = exc.code or 500
        headers = {}
        if status == 405 and exc.valid_methods:  # type: ignore[attr-defined]
            headers["Allow"] = ", ".join(exc.valid_methods)  # type: ignore[attr-defined]
        code = _HTTP_CODES.get(status, re.sub(r"\W+", "_", (exc.name or "error").lower()))
        return _error(status, code, exc.description or exc.name or "", headers=headers)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> tuple[Response, int]:
        request_id = g.get("request_id", "")
        log.exception("unhandled error, request_id=%s", request_id)
        return _error(
            500,
            "internal_error",
            "Internal error. Quote the request_id to find it in the log.",
            request_id=request_id,
        )
