"""HTTP handlers of the seed's API: parse at the edge, call one domain function, answer."""

from __future__ import annotations

from flask import Blueprint, Response

from . import notifications
from .idempotency import idempotent
from .schemas import CreateRequest, EmailIdPath, EmailRequest, ListQuery, ReadRequest
from .web import ok, parse_body, parse_query, parse_query_or_body, services

bp = Blueprint("notifications", __name__)


@bp.post("/create")
@idempotent("create")
def create() -> tuple[Response, int]:
    """Record and/or queue the email of a notification. 201 with their ids."""
    request = parse_body(CreateRequest)
    return ok(notifications.create_notification(services(), request), 201)


@bp.get("/list")
def list_() -> tuple[Response, int]:
    """Counts and one page of a user's notifications, newest first."""
    svc = services()
    query = parse_query(ListQuery, list_max_limit=svc.config.list_max_limit)
    return ok(notifications.list_notifications(svc, query))


@bp.post("/read")
def read() -> tuple[Response, int]:
    """Mark a notification read (query parameters, as the seed says, or a JSON body)."""
    notifications.mark_read(services(), parse_query_or_body(ReadRequest))
    return ok()


@bp.post("/email")
@idempotent("email")
def email() -> tuple[Response, int]:
    """Queue an email with the caller's own subject and text. 202 with its id."""
    email_id = notifications.queue_email(services(), parse_body(EmailRequest))
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
