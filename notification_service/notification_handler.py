"""HTTP handlers of the seed's API: parse at the edge, call one domain function, answer."""

from __future__ import annotations

from flask import Blueprint, Response
from flask import request as http_request

from . import notifications
from .idempotency import idempotent, request_ids
from .mongo_connector import with_own_deadline
from .schemas import (
    Counts,
    CreateRequest,
    DeleteAllRequest,
    DeleteRequest,
    EmailIdPath,
    EmailRequest,
    ListQuery,
    ReadAllRequest,
    ReadRequest,
    UserQuery,
)
from .web import not_modified, ok, parse_body, parse_query, parse_query_or_body, services

bp = Blueprint("notifications", __name__)


@bp.post("/create")
@idempotent("create")
def create() -> tuple[Response, int]:
    """Record and/or queue the email of a notification for one user (201 with the ids
    and the user's counts) or for each of `user_ids` (an outcome per user)."""
    request = parse_body(CreateRequest)
    ids, repeat = request_ids()
    svc = services()
    if request.user_ids is None:
        return ok(notifications.create_notification(svc, request, ids, repeat=repeat), 201)
    # Up to 1,000 users: a batch job's database budget, not a click's.
    result = with_own_deadline(
        svc.config.fan_out_timeout_seconds,
        lambda: notifications.fan_out(svc, request, ids, repeat=repeat),
    )
    return ok(result, 201 if result["totals"]["created"] else 200)


@bp.get("/list")
def list_() -> tuple[Response, int]:
    """Counts and one page of a user's notifications, newest first."""
    svc = services()
    query = parse_query(ListQuery, list_max_limit=svc.config.list_max_limit)
    return ok(notifications.list_notifications(svc, query))


@bp.get("/count")
def count() -> tuple[Response, int]:
    """The user's totals from one small read, with an ETag: 304 while they are the same."""
    counts = notifications.count(services(), parse_query(UserQuery))
    tag = etag(counts)
    if http_request.if_none_match.contains_weak(tag):
        return not_modified(tag)
    response, status = ok(counts)
    response.set_etag(tag)
    # Cached copies must be checked each time (a 304 is cheap): counts change any time.
    response.headers["Cache-Control"] = "no-cache"
    return response, status


def etag(counts: Counts) -> str:
    """The tag of the counts themselves, so it changes exactly when they do."""
    return f"{counts['elements']}-{counts['new']}"


@bp.post("/read")
def read() -> tuple[Response, int]:
    """Mark a notification read (query parameters, as the seed says, or a JSON body)."""
    return ok(notifications.mark_read(services(), parse_query_or_body(ReadRequest)))


@bp.post("/read-all")
def read_all() -> tuple[Response, int]:
    """Mark all read, or only `up_to` and the older ones; how many changed and the counts."""
    return ok(notifications.mark_all_read(services(), parse_query_or_body(ReadAllRequest)))


@bp.post("/delete")
def delete() -> tuple[Response, int]:
    """Remove one notification; one already gone answers `deleted: 0`."""
    return ok(notifications.delete(services(), parse_query_or_body(DeleteRequest)))


@bp.post("/delete-all")
def delete_all() -> tuple[Response, int]:
    """Remove all of a user's notifications, or with `read=true` only the read ones."""
    return ok(notifications.delete_all(services(), parse_query_or_body(DeleteAllRequest)))


@bp.post("/email")
@idempotent("email")
def email() -> tuple[Response, int]:
    """Queue an email with the caller's own subject and text. 202 with its id."""
    email_id = notifications.queue_email(services(), parse_body(EmailRequest), request_ids()[0])
    return ok({"email_id": email_id}, 202)


@bp.get("/email/<email_id>")
def email_state(email_id: str) -> tuple[Response, int]:
    """Where a queued email is: queued, sending, sent or failed, with its attempts."""
    path = EmailIdPath.model_validate({"email_id": email_id})
    return ok(notifications.email_state(services(), path.email_id))


@bp.get("/health")
def health() -> tuple[Response, int]:
    """Liveness: the process answers. No database call, and no API key needed."""
    return ok({"status": "ok"})


READY_TIMEOUT_SECONDS = 1.0


@bp.get("/ready")
def ready() -> tuple[Response, int]:
    """Readiness: the database answers within a second (else 503), and the outbox's
    depth and the wait of its oldest due email. No API key needed."""
    svc = services()
    bound = min(READY_TIMEOUT_SECONDS, svc.config.db_timeout_ms / 1000)
    return ok(with_own_deadline(bound, lambda: notifications.readiness(svc)))
