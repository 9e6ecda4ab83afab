"""The domain: what creating, listing and reading a notification means.

Plain functions that take their collaborators (storage, outbox, templates, clock) in a
`Services` bundle, so tests pass real ones and may fake only the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .config import Config
from .email_templates import EmailContent, EmailTemplates
from .errors import EmailNotFound, UserHasNoEmail
from .keys import KEYS
from .mongo_connector import IdempotencyStore, InboxStore, new_id
from .outbox import Outbox
from .schemas import (
    CreateRequest,
    CreateResult,
    EmailRequest,
    EmailState,
    InboxPage,
    ListQuery,
    Notification,
    ReadRequest,
)

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Services:
    config: Config
    store: InboxStore
    outbox: Outbox
    templates: EmailTemplates
    idempotency: IdempotencyStore
    clock: Clock = utc_now


def create_notification(svc: Services, request: CreateRequest) -> CreateResult:
    """Record and/or email a notification as its key says; the email is queued durably.

    :raise UserNotFound: unknown user outside test mode (EMAIL unset).
    :raise UserHasNoEmail: the key sends email and the user has no address; nothing written.
    """
    route = KEYS[request.key]
    now = svc.clock()
    notification: Notification = {
        "id": new_id(),
        "timestamp": int(now.timestamp()),
        "is_new": True,
        "user_id": request.user_id,
        "key": request.key,
        "target_id": request.target_id,
        "data": request.data,
    }
    if svc.config.email is not None:
        # Test mode of the original assignment: the user is made first, so that storing
        # the notification stays one update (that a bulk write can mirror).
        svc.store.ensure_user(request.user_id, svc.config.email)
    user = None
    if route.record:
        user = svc.store.append_capped(request.user_id, notification, require_email=route.email)
    elif route.email:
        user = svc.store.find_user(request.user_id)
    email_id = None
    if route.email:
        assert user is not None  # returned by both calls above when the key sends email
        email_id = _queue_notification_email(svc, notification, user, now)
    return {
        "notification_id": notification["id"] if route.record else None,
        "email_id": email_id,
    }


def list_notifications(svc: Services, query: ListQuery) -> InboxPage:
    """The counts and one page of the user's notifications, newest first.

    :raise UserNotFound:
    """
    result = svc.store.inbox_page(query.user_id, query.skip, query.limit)
    return {
        "elements": result["elements"],
        "new": result["new"],
        "request": {"user_id": query.user_id, "skip": query.skip, "limit": query.limit},
        "list": result["list"],
    }


def mark_read(svc: Services, request: ReadRequest) -> None:
    """Mark one notification read; idempotent.

    :raise UserNotFound: / :raise NotificationNotFound:
    """
    svc.store.mark_read(request.user_id, request.notification_id)


def queue_email(svc: Services, request: EmailRequest) -> str:
    """Queue an email with the caller's own subject and text; return its id.

    :raise UserNotFound: / :raise UserHasNoEmail: when addressed by user_id.
    """
    to = request.to
    if request.user_id is not None:
        to = _address(svc.store.find_user(request.user_id))
    assert to is not None  # the model requires exactly one of user_id and to
    content = EmailContent(subject=request.subject, text=request.text, html=request.html)
    return _enqueue(svc, "custom", to, content, svc.clock(), user_id=request.user_id)


def email_state(svc: Services, email_id: str) -> EmailState:
    """The delivery state of one queued email.

    :raise EmailNotFound:
    """
    record = svc.outbox.get(email_id)
    if record is None:
        raise EmailNotFound()
    status = record["status"]
    return {
        "id": str(record["_id"]),
        "status": status,
        "to": record["to"],
        "subject": record["subject"],
        "kind": record.get("kind", "notification"),
        "user_id": record.get("user_id"),
        "notification_id": record.get("notification_id"),
        "key": record.get("key"),
        "message_id": record["message_id"],
        "attempts": record["attempts"],
        "created_at": _iso(record["created_at"]) or "",
        # For a claimed record this field holds the lease's end: not a time to show.
        "next_attempt_at": _iso(record["next_attempt_at"]) if status == "queued" else None,
        "sent_at": _iso(record.get("sent_at")),
        "failed_at": _iso(record.get("failed_at")),
        "last_error": record.get("last_error"),
    }


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address(user: dict[str, Any]) -> str:
    address = user.get("email")
    # Same rule as the storage query that guards the record (a non-empty string), so a
    # create is refused before anything is written. A malformed address is the SMTP
    # server's to judge: it ends as a failed outbox record, visible at GET /email/<id>.
    if not isinstance(address, str) or not address:
        raise UserHasNoEmail()
    return address


def message_id(config: Config) -> str:
    """A globally unique Message-ID, fixed at enqueue so that every retry carries it."""
    domain = config.smtp_email.rpartition("@")[2] or "localhost"
    return f"<{new_id()}.notification-service@{domain}>"


def _queue_notification_email(
    svc: Services, notification: Notification, user: dict[str, Any], now: datetime
) -> str:
    address = _address(user)
    content = svc.templates.render(notification, user)
    return _enqueue(
        svc,
        "notification",
        address,
        content,
        now,
        user_id=notification["user_id"],
        notification_id=notification["id"],
        key=notification["key"],
    )


def _enqueue(
    svc: Services,
    kind: str,
    to: str,
    content: EmailContent,
    now: datetime,
    *,
    user_id: str | None,
    notification_id: str | None = None,
    key: str | None = None,
) -> str:
    """Queue one rendered email: the one place that says what an outbox record holds."""
    return svc.outbox.enqueue(
        {
            "kind": kind,
            "to": to,
            "subject": content.subject,
            "text": content.text,
            "html": content.html,
            "message_id": message_id(svc.config),
            "user_id": user_id,
            "notification_id": notification_id,
            "key": key,
        },
        now,
    )
