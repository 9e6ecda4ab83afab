"""HTTP handlers: each route declared once (api.py), then one domain call.

The declaration says the input model and where it is read from, the answers and the
errors; api.py parses, serializes and documents from it (openapi.py), so a view only
calls the domain.
"""

from __future__ import annotations

import functools
from importlib.resources import files
from typing import Any

from flask import Blueprint, Response, current_app, g, jsonify, request
from pydantic import BaseModel

from . import (
    email_handler,
    metrics,
    notifications,
    openapi,
    preference_handler,
    sse,
    tokens,
    user_data_handler,
)
from .api import TOKEN_EXPIRES_AT, Answer, Api, Link, Reply
from .context import hold_stream
from .errors import (
    EmailNotFound,
    FanOutCutShort,
    IdempotencyKeyInUse,
    IdempotencyKeyReused,
    NotFound,
    NotificationNotFound,
    TokensNotConfigured,
    TooManyFanOuts,
    TooManyStreams,
    UserDocumentInvalid,
    UserHasNoEmail,
    UserNotFound,
)
from .idempotency import request_ids
from .runtime import Runtime
from .schemas import (
    AssetPath,
    Counts,
    CreateRequest,
    CreateResult,
    DeleteAllRequest,
    DeleteRequest,
    DeleteResult,
    EmailIdPath,
    EmailQueued,
    EmailRequest,
    EmailState,
    FanOutResult,
    Health,
    InboxAssetPath,
    InboxPage,
    InboxQuery,
    ListQuery,
    ReadAllRequest,
    ReadAllResult,
    Readiness,
    ReadRequest,
    TokenIssued,
    TokenRequest,
    UserQuery,
)
from .storage.mongo_connector import with_own_deadline
from .web import services

bp = Blueprint("notifications", __name__)
api = Api(bp)

_USER = "A user's id: the `_id` of their document, 24 hexadecimal characters."
_COUNTS = "The user's counts after the change."

# What a client does next with an answer, as OpenAPI links (schemathesis follows them).
_CREATED_USER = {"user_id": "$request.body#/user_id"}
_CREATED = {**_CREATED_USER, "notification_id": "$response.body#/data/notification_id"}
_CREATE_LINKS = {
    "MarkRead": Link("read", _CREATED, "Mark the new notification read."),
    "Delete": Link("delete", _CREATED, "Remove the new notification."),
    "List": Link("list", _CREATED_USER, "The user's inbox, the new one first."),
    "FollowEmail": Link(
        "email_state", {"email_id": "$response.body#/data/email_id"}, "Follow its email."
    ),
}


@api.route(
    "POST",
    "/create",
    source="body",
    model=CreateRequest,
    answers={
        201: Answer(
            "Created: for `user_id`, the ids and the user's counts (null counts for a key "
            "that records nothing); for `user_ids`, an outcome per user.",
            CreateResult | FanOutResult,
            links=_CREATE_LINKS,
        ),
        200: Answer(
            "Nothing created: a fan-out in which no user got the notification, or one "
            "user whose preferences turned off every channel of the key (null ids, "
            "`skipped` lists them).",
            CreateResult | FanOutResult,
        ),
    },
    errors=(
        UserNotFound,
        UserHasNoEmail,
        UserDocumentInvalid,
        IdempotencyKeyReused,
        IdempotencyKeyInUse,
        TooManyFanOuts,
        FanOutCutShort,
    ),
    idempotency_scope="create",
    body_example={
        "user_id": "6756b2f1a4c3e0d9b8f71234",
        "key": "new_post",
        "target_id": "6756b2f1a4c3e0d9b8f75678",
        "data": {"title": "A new post"},
    },
)
def create(request: CreateRequest) -> CreateResult | Reply:
    """Record a notification and/or queue its email, as its key says.

    For one user (`user_id`), or for each of up to 1,000 `user_ids` (a fan-out: one
    outcome per user, 201 if any was created, else 200). A server process runs half as
    many fan-outs at once as it has threads (at least one); past that, 503
    `too_many_fan_outs` with `Retry-After`.
    """
    ids, repeat = request_ids()
    svc = services()
    if request.user_ids is None:
        created = notifications.create_notification(svc, request, ids, repeat=repeat)
        if created["skipped"] and created["notification_id"] is created["email_id"] is None:
            return Reply(created, 200)  # every channel turned off by the user: nothing made
        return created
    # Never wait for a slot: a fan-out waiting here would hold a thread all the same.
    slots = _runtime().fan_outs
    if not slots.acquire(blocking=False):
        raise TooManyFanOuts()
    try:
        # Up to 1,000 users: a batch job's database budget, not a click's.
        result = with_own_deadline(
            svc.config.fan_out_timeout_seconds,
            lambda: notifications.fan_out(svc, request, ids, repeat=repeat),
        )
    finally:
        slots.release()
    return Reply(result, 201 if result["totals"]["created"] else 200)


def _runtime() -> Runtime:
    runtime: Runtime = current_app.extensions["notification_service"]
    return runtime


def _list_limit(config: Any) -> dict[str, Any]:
    return {"list_max_limit": config.list_max_limit}


@api.route(
    "GET",
    "/list",
    auth="key_or_token",
    source="query",
    model=ListQuery,
    context=_list_limit,
    answers={
        200: Answer(
            "The user's counts and one page of notifications.",
            InboxPage,
            links={
                "MarkNewestRead": Link(
                    "read",
                    {
                        "user_id": "$request.query.user_id",
                        "notification_id": "$response.body#/data/list/0/id",
                    },
                    "Mark the first listed notification read.",
                )
            },
        )
    },
    errors=(UserNotFound,),
    params={
        "user_id": _USER,
        "skip": "How many of the newest to pass over.",
        "limit": "How many to list (at most LIST_MAX_LIMIT).",
        "is_new": "Only the unread (true) or the read (false) ones.",
        "key": "Only notifications of this key.",
    },
)
def list_(query: ListQuery) -> InboxPage:
    """Counts and one page of a user's notifications, newest first.

    `elements` and `new` are the user's totals; `matched` counts those the filters match.
    """
    return notifications.list_notifications(services(), query)


def etag(counts: Counts) -> str:
    """The tag of the counts themselves, so it changes exactly when they do."""
    return f"{counts['elements']}-{counts['new']}"


@api.route(
    "GET",
    "/count",
    auth="key_or_token",
    source="query",
    model=UserQuery,
    etag=etag,
    answers={
        200: Answer("The user's totals.", Counts, headers=("ETag", "Cache-Control")),
        304: Answer("The counts are those of `If-None-Match`.", headers=("ETag",)),
    },
    errors=(UserNotFound,),
    params={"user_id": _USER},
)
def count(query: UserQuery) -> Counts:
    """The user's totals, with an ETag: 304 while they are the same.

    One small read: what an unread badge polls.
    """
    return notifications.count(services(), query)


_STREAM_EXAMPLE = (
    "retry: 3000\n\n"
    'id: 6756b2f1a4c3e0d9b8f71111\nevent: counts\ndata: {"elements":3,"new":1}\n\n'
    ": keep-alive\n\n"
    "id: 6756b2f1a4c3e0d9b8f72222\nevent: notification\n"
    'data: {"id":"6756b2f1a4c3e0d9b8f72222","timestamp":1733734001,"is_new":true,'
    '"user_id":"6756b2f1a4c3e0d9b8f71234","key":"new_post",'
    '"target_id":"6756b2f1a4c3e0d9b8f75678","data":{"title":"A new post"}}\n\n'
    'id: 6756b2f1a4c3e0d9b8f72222\nevent: counts\ndata: {"elements":4,"new":2}\n\n'
)


@api.route(
    "GET",
    "/stream",
    auth="key_or_token",
    query_token=True,
    source="query",
    model=UserQuery,
    answers={
        200: Answer(
            "Server-Sent Events, until the client leaves: `notification` and `counts` "
            "events, and a `: keep-alive` comment after STREAM_HEARTBEAT_SECONDS of silence.",
            headers=("Cache-Control",),
            media_types=("text/event-stream",),
            envelope=False,
            example=_STREAM_EXAMPLE,
        )
    },
    errors=(UserNotFound, TooManyStreams),
    params={"user_id": _USER},
    headers=("LastEventId",),
)
def stream(query: UserQuery) -> Response:
    """The user's inbox as it changes: Server-Sent Events, for EventSource.

    First a `counts` event ({elements, new}); then a `notification` event (one element
    of `/list`'s `list`) for each new notification, and a `counts` event whenever the
    counts change (a create, a read, a delete, an expiry). Each event's id is the newest
    notification the client has been told of: sent back as `Last-Event-ID`, the
    notifications made since, still in the inbox, are sent first. Past
    STREAM_MAX_PER_PROCESS open streams: 503 with Retry-After. Opened with a user token
    (which may come as `?token=`, as EventSource sends no headers), the stream ends when
    the token expires.
    """
    feed = sse.Feed(sse.resume_point(request.headers.get("Last-Event-ID")))
    first = feed.advance(notifications.inbox_state(services(), query.user_id))
    # Opened by a user token: the stream ends when the token does (EventSource's
    # reconnection is then refused), so a stolen token cannot listen on for ever.
    hold_stream(request.environ, query.user_id, feed, until=g.get(TOKEN_EXPIRES_AT))
    response = Response(sse.RETRY + first, mimetype="text/event-stream")
    response.headers["Cache-Control"] = "no-cache"
    response.headers["X-Accel-Buffering"] = "no"  # nginx would otherwise buffer the events
    return response


_READ_PARAMS = {"user_id": _USER, "notification_id": "The notification's `id`."}


@api.route(
    "POST",
    "/read",
    auth="key_or_token",
    source="query_or_body",
    model=ReadRequest,
    answers={200: Answer(_COUNTS, Counts)},
    errors=(UserNotFound, NotificationNotFound),
    params=_READ_PARAMS,
)
def read(request: ReadRequest) -> Counts:
    """Mark a notification read.

    Its fields in the query string, as the seed's API has it, or in a JSON body.
    """
    return notifications.mark_read(services(), request)


@api.route(
    "POST",
    "/read-all",
    auth="key_or_token",
    source="query_or_body",
    model=ReadAllRequest,
    answers={200: Answer("How many changed, and the user's counts.", ReadAllResult)},
    errors=(UserNotFound, NotificationNotFound),
    params={
        "user_id": _USER,
        "up_to": "Mark only this notification and the older ones (a watermark).",
    },
)
def read_all(request: ReadAllRequest) -> ReadAllResult:
    """Mark all of a user's notifications read, or only `up_to` and the older ones."""
    return notifications.mark_all_read(services(), request)


@api.route(
    "POST",
    "/delete",
    auth="key_or_token",
    source="query_or_body",
    model=DeleteRequest,
    answers={200: Answer("How many were removed (0 or 1), and the counts.", DeleteResult)},
    errors=(UserNotFound,),
    params=_READ_PARAMS,
)
def delete(request: DeleteRequest) -> DeleteResult:
    """Remove one notification; one already gone answers `deleted: 0`."""
    return notifications.delete(services(), request)


@api.route(
    "POST",
    "/delete-all",
    auth="key_or_token",
    source="query_or_body",
    model=DeleteAllRequest,
    answers={200: Answer("How many were removed, and the counts.", DeleteResult)},
    errors=(UserNotFound,),
    params={"user_id": _USER, "read": "true: only the read ones."},
)
def delete_all(request: DeleteAllRequest) -> DeleteResult:
    """Remove all of a user's notifications, or with `read=true` only the read ones."""
    return notifications.delete_all(services(), request)


@api.route(
    "POST",
    "/token",
    source="body",
    model=TokenRequest,
    answers={
        201: Answer(
            "The token, for `Authorization: Bearer` (or `?token=` on GET /stream), and its "
            "expiry in unix seconds.",
            TokenIssued,
        )
    },
    errors=(TokensNotConfigured,),
    tag="tokens",
    uses_database=False,
    body_example={"user_id": "6756b2f1a4c3e0d9b8f71234", "ttl_seconds": 3600},
    params={"ttl_seconds": "Seconds the token lasts."},
)
def token(request: TokenRequest) -> TokenIssued:
    """Mint a user token: what a browser uses instead of an API key.

    The token opens the inbox routes (list, count, read, read-all, delete, delete-all,
    stream) for `user_id` only, until it expires (`ttl_seconds`, 1 hour by default, 24
    at most). Your backend can mint the same tokens itself with USER_TOKEN_SECRET (the
    README's recipe); this route is for key holders that would rather ask.
    """
    svc = services()
    secret = svc.config.user_token_key
    if secret is None:
        raise TokensNotConfigured()
    expires_at = int(svc.clock().timestamp()) + request.ttl_seconds
    minted = tokens.mint(secret.reveal().encode("utf-8"), request.user_id, expires_at)
    return {"token": minted, "user_id": request.user_id, "expires_at": expires_at}


@api.route(
    "POST",
    "/email",
    source="body",
    model=EmailRequest,
    answers={
        202: Answer(
            "Queued: the email's id, to follow it with GET /email/{id}.",
            EmailQueued,
            links={
                "FollowEmail": Link("email_state", {"email_id": "$response.body#/data/email_id"})
            },
        )
    },
    errors=(UserNotFound, UserHasNoEmail, IdempotencyKeyReused, IdempotencyKeyInUse),
    idempotency_scope="email",
    tag="email",
    body_example={"to": "someone@example.com", "subject": "Hello", "text": "Hi there."},
)
def email(request: EmailRequest) -> EmailQueued:
    """Queue an email with the caller's own subject and text.

    To a user's address (`user_id`) or to an address (`to`); the outbox sends it.
    """
    return {"email_id": notifications.queue_email(services(), request, request_ids()[0])}


@api.route(
    "GET",
    "/email/<email_id>",
    source="path",
    model=EmailIdPath,
    answers={200: Answer("The email's state and attempts.", EmailState)},
    errors=(EmailNotFound,),
    tag="email",
    params={"email_id": "The id POST /email answered."},
)
def email_state(path: EmailIdPath) -> EmailState:
    """Where a queued email is: queued, sending, sent or failed."""
    return notifications.email_state(services(), path.email_id)


# GET/PUT /preferences and GET/POST /unsubscribe/<token> (preference_handler.py).
preference_handler.declare(api)
# GET /users/<id>/export and DELETE /users/<id>/data (user_data_handler.py).
user_data_handler.declare(api)
# GET /email?status=failed, POST /email/<email_id>/resend and POST /email/failed/resend
# (email_handler.py).
email_handler.declare(api)


@api.route(
    "GET",
    "/health",
    answers={200: Answer("The process answers.", Health)},
    tag="operations",
    auth="open",
    uses_database=False,
)
def health() -> Health:
    """Liveness: the process answers.

    No database call, and no API key needed.
    """
    return {"status": "ok"}


READY_TIMEOUT_SECONDS = 1.0


@api.route(
    "GET",
    "/ready",
    answers={200: Answer("The database answers; the outbox's depth and wait.", Readiness)},
    tag="operations",
    auth="open",
)
def ready() -> Readiness:
    """Readiness: the database answers within a second, else 503.

    With the outbox's depth and how long its oldest due email has waited. No API key
    needed.
    """
    svc = services()
    bound = min(READY_TIMEOUT_SECONDS, svc.config.db_timeout_ms / 1000)
    return with_own_deadline(bound, lambda: notifications.readiness(svc))


@api.route(
    "GET",
    "/metrics",
    answers={
        200: Answer(
            "Prometheus' text format: the processes' counters and histograms, and the "
            "outbox's depth read from the database (database_up 0 when it does not answer).",
            media_types=("text/plain",),
            envelope=False,
        )
    },
    tag="operations",
    # A scrape answers 200 while the database does not (database_up 0), never 503.
    uses_database=False,
)
def metrics_() -> Response:
    """Metrics for Prometheus: requests, notifications, emails, the outbox, SMTP.

    Needs the API key when API_KEYS is set (Prometheus sends it with `authorization`).
    """
    return Response(metrics.scrape(services()), content_type=metrics.CONTENT_TYPE)


@api.route(
    "GET",
    "/openapi.json",
    answers={200: Answer("This document.", envelope=False)},
    tag="operations",
    auth="open",
    uses_database=False,
)
def openapi_document() -> Response:
    """The OpenAPI 3.1 document of this API, generated from its route declarations."""
    cache = current_app.extensions
    if "notification_service.openapi" not in cache:  # the declarations never change
        cache["notification_service.openapi"] = openapi.document(api.endpoints, services().config)
    return jsonify(cache["notification_service.openapi"])


_STATIC = files("notification_service") / "static"
_DOCS_ASSETS = {
    "swagger-ui.css": ("swagger-ui/swagger-ui.css", "text/css"),
    "swagger-ui-bundle.js": ("swagger-ui/swagger-ui-bundle.js", "text/javascript"),
    "docs.js": ("docs.js", "text/javascript"),
}
# The page runs only the scripts it ships; Swagger UI sets inline styles and shows
# data: images, and its "try it out" calls this same origin.
_DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'"
)


@api.route(
    "GET",
    "/docs",
    answers={
        200: Answer(
            "Swagger UI, served from the package (no network needed).",
            media_types=("text/html",),
            envelope=False,
        )
    },
    tag="operations",
    auth="open",
    uses_database=False,
)
def docs() -> Response:
    """Interactive documentation of this API."""
    return _static_file("docs.html", "text/html", _DOCS_POLICY)


def _assets(name: str, page: str, label: str, model: type[BaseModel],
            assets: dict[str, tuple[str, str]], policy: str, tag: str) -> None:  # fmt: skip
    """Declare `GET /<page>/<asset>`: the scripts and style sheets of one page, from a
    fixed list, so that nothing else of the package is ever served."""

    def view(path: Any) -> Response:
        if path.asset not in assets:
            raise NotFound(f"No such file of the {label} page.")
        file, media_type = assets[path.asset]
        return _static_file(file, media_type, policy)

    view.__name__ = name
    view.__doc__ = f"A script or style sheet of the {label} page."
    api.route(
        "GET",
        f"/{page}/<asset>",
        source="path",
        model=model,
        answers={
            200: Answer(
                f"A file of the {label} page.",
                media_types=("text/css", "text/javascript"),
                envelope=False,
            )
        },
        errors=(NotFound,),
        tag=tag,
        auth="open",
        uses_database=False,
        params={"asset": "A file the page loads."},
    )(view)


_assets("docs_asset", "docs", "documentation", AssetPath, _DOCS_ASSETS, _DOCS_POLICY, "operations")


_INBOX_ASSETS = {
    "inbox.css": ("inbox/inbox.css", "text/css"),
    "inbox.js": ("inbox/inbox.js", "text/javascript"),
}
# Stricter than the docs': no inline style either, nothing but this origin's script,
# style sheet and API. Each text of a notification is set as text (textContent) anyway.
_INBOX_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)


@api.route(
    "GET",
    "/inbox",
    source="query",
    model=InboxQuery,
    answers={
        200: Answer(
            "A demo inbox page: the reference client of the inbox API and its stream.",
            media_types=("text/html",),
            envelope=False,
        )
    },
    tag="inbox page",
    auth="open",
    uses_database=False,
    params={
        "user_id": "Whose inbox, when the service needs no key.",
        "token": "A user token (POST /token): the page calls the API with it. "
        "`#token=` works too and is never sent to any server.",
    },
)
def inbox(query: InboxQuery) -> Response:
    """A live inbox in the browser: the list, the unread badge, read, delete, and new ones
    at the top as they come.

    The page holds no data: its script calls the API (with the token it was given) and
    follows GET /stream.
    """
    page = _static_file("inbox/inbox.html", "text/html", _INBOX_POLICY)
    # Its URL may hold a token: no cache keeps it (the page is small and never changes).
    page.headers["Cache-Control"] = "no-store"
    return page


_assets("inbox_asset", "inbox", "inbox", InboxAssetPath, _INBOX_ASSETS, _INBOX_POLICY, "inbox page")


def _static_file(path: str, media_type: str, policy: str) -> Response:
    response = Response(_read_static(path), mimetype=media_type)
    response.cache_control.public = True
    response.cache_control.max_age = 3600
    response.headers["Content-Security-Policy"] = policy
    # Beside CSP's frame-ancestors, for browsers that read only the older header.
    response.headers["X-Frame-Options"] = "DENY"
    # The inbox page's URL may hold a token: no other site learns it from a Referer.
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@functools.cache
def _read_static(path: str) -> bytes:
    return _STATIC.joinpath(path).read_bytes()  # a few files, 1.7 MB, read once
