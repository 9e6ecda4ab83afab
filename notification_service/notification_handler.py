"""HTTP handlers of the seed's API: parse at the edge, call one domain function, answer."""

from __future__ import annotations

from flask import Blueprint, Response

from . import notifications
from .schemas import CreateRequest, ListQuery, ReadRequest
from .web import ok, parse_body, parse_query, parse_query_or_body, services

bp = Blueprint("notifications", __name__)


@bp.post("/create")
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
