"""Dead letters: the failed emails of the outbox, listed and sent again.

An email is failed when its SMTP server refused it for good, or when it ran out of
DISPATCH_MAX_ATTEMPTS or DISPATCH_MAX_AGE_SECONDS (dispatcher.py). It stays in the
outbox, visible here, until it is resent or its failed record is removed after
OUTBOX_RETENTION_DAYS. A resend makes it queued again, with its attempts and its
give-up age restarted and its earlier life kept in `history`
(storage/dead_letter_store.py, DeadLetterStore.requeue).

Plain functions over the `Services` bundle, like notifications.py.
"""

from __future__ import annotations

from .errors import EmailNotFailed, EmailNotFound
from .notifications import Services, email_view
from .schemas import DeadLetterPage, DeadLetterQuery, EmailState, ResendAllRequest, ResendResult


def list_failed(svc: Services, query: DeadLetterQuery) -> DeadLetterPage:
    """One page of the failed emails (of `query.key`), newest failure first, and how many
    are failed in all."""
    records, matched = svc.outbox.dead_letters.failed_page(query.skip, query.limit, key=query.key)
    return {"list": [email_view(record) for record in records], "matched": matched}


def resend(svc: Services, email_id: str) -> EmailState:
    """Put one failed email back in the queue; return its state after.

    :raise EmailNotFound: no email with this id.
    :raise EmailNotFailed: it is not failed (queued, sent, or resent by another request
        first: of concurrent resends, exactly one succeeds).
    """
    if not svc.outbox.dead_letters.requeue(email_id, svc.clock()):
        # Which answer: read only on this, the rare path.
        if svc.outbox.get(email_id) is None:
            raise EmailNotFound()
        raise EmailNotFailed()
    record = svc.outbox.get(email_id)
    if record is None:
        # Removed between the two calls (an erase): it was requeued all the same.
        raise EmailNotFound()
    return email_view(record)


def resend_all(svc: Services, request: ResendAllRequest) -> ResendResult:
    """Put every failed email (of `request.key`, failed before `request.failed_before`)
    back in the queue; answer how many."""
    requeued = svc.outbox.dead_letters.requeue_failed(
        svc.clock(), key=request.key, failed_before=request.failed_before
    )
    return {"requeued": requeued}
