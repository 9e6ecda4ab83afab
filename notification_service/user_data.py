"""A user's data: what the service holds about one user, exported (GDPR article 15) and
erased (article 17).

What the service holds of a user, and where:

- in the application's user document: the notifications array and its meta
  (`<field>`, `<field>_meta`), and the preferences (`<field>_prefs`). The document
  itself and its other fields (its `email`...) are the application's;
- in the outbox: the emails of the user (`user_id`), and those sent to their address
  with no user (POST /email's `to`);
- in the idempotency records: the stored answers of keyed requests that named them.

An erasure removes the array and its meta, cancels what was not sent yet (and what is in
flight), deletes what was sent or failed, and removes the user from stored answers. It
keeps the preferences: they hold no address, only which keys the user turned off, and
dropping them would subscribe again someone who had opted out. It keeps the
application's document and its fields. It can be run again: what is gone is not found
again, and every count is then 0.

The address is the document's `email`; `?email=` adds one (the application may have
deleted its document before asking). A record of another user sent to the same address
is that user's, and is never touched (UserEmailStore.of_user).
"""

from __future__ import annotations

from . import preferences
from .errors import UserNotFound
from .notifications import Services, email_view
from .schemas import ErasureReport, Preferences, UserExport
from .storage.inbox_store import has_email
from .storage.mongo_connector import Document

# What an export reads of each email: what GET /email/<id> shows, and not the content.
_EMAIL_FIELDS: Document = {
    field: 1
    for field in (
        "status", "to", "subject", "kind", "user_id", "notification_id", "notification_ids",
        "key", "message_id", "attempts", "created_at", "next_attempt_at", "sent_at",
        "failed_at", "cancelled_at", "cancel_reason", "last_error",
    )
}  # fmt: skip


def export(svc: Services, user_id: str, email: str | None = None) -> UserExport:
    """Everything the service holds about the user: notifications, preferences, and the
    emails of their id or sent to their address (the document's, and `email`).

    An id the service knows nothing of answers an empty export (with `user_document`
    false), not a 404: "nothing" is the answer to give the person who asked, and an
    export run after the application deleted its document must not fail.
    """
    document = svc.store.held_for(user_id)
    addresses = _addresses(document, email)
    notifications = []
    if document is not None and isinstance(document.get(svc.store.field), list):
        notifications = document[svc.store.field]
    records = svc.outbox.user_emails.of_user(user_id, addresses, _EMAIL_FIELDS)
    return {
        "user_id": user_id,
        "user_document": document is not None,
        "addresses": addresses,
        "notifications": notifications,
        "preferences": _preferences(svc, user_id) if document is not None else None,
        "emails": [email_view(record) for record in records],
    }


def erase(svc: Services, user_id: str, email: str | None = None) -> ErasureReport:
    """Erase what the service holds about the user (see the module); say what, by kind.

    The emails first: once none of them can be sent, the stored answers lose the user,
    then the array goes (a create racing this erasure may still add a notification
    after it: run it again once the application stops creating them).
    """
    document = svc.store.held_for(user_id)
    addresses = _addresses(document, email)
    records = svc.outbox.user_emails.of_user(user_id, addresses, {"_id": 1})
    ids = [record["_id"] for record in records]
    emails = svc.outbox.user_emails.erase(ids, svc.clock())
    answers = svc.idempotency.erase_outcomes(user_id, [str(i) for i in ids])
    notifications = svc.store.erase_notifications(user_id)
    return {
        "notifications": notifications,
        "emails_cancelled": emails["cancelled"],
        "emails_in_flight": emails["in_flight"],
        "emails_erased": emails["deleted"],
        "idempotency_records": answers,
    }


def _addresses(document: Document | None, email: str | None) -> list[str]:
    """The user's addresses: their document's, and the one given (once each)."""
    found = [document["email"]] if document is not None and has_email(document) else []
    if email is not None and email not in found:
        found.append(email)
    return found


def _preferences(svc: Services, user_id: str) -> Preferences | None:
    try:
        return preferences.get(svc, user_id)
    except UserNotFound:  # deleted between the two reads
        return None
