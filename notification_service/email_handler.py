"""HTTP handlers of the dead letters: failed emails listed (GET /email?status=failed) and
sent again, one (POST /email/<id>/resend) or in bulk (POST /email/failed/resend).

Declared on notification_handler's route table (`declare(api)`), so that the same
parsing, API key and OpenAPI document cover them; each view calls one function of
dead_letters.py. An operator's routes: an API key opens them, a user token never does.
"""

from __future__ import annotations

from . import dead_letters, metrics
from .api import Answer, Api, Link
from .errors import EmailNotFailed, EmailNotFound
from .schemas import (
    DeadLetterPage,
    DeadLetterQuery,
    EmailIdPath,
    EmailState,
    ResendAllRequest,
    ResendResult,
)
from .web import services


def failed_emails(query: DeadLetterQuery) -> DeadLetterPage:
    """The failed emails (dead letters), newest failure first, one page at a time.

    Each as GET /email/{email_id} shows it: address, subject, key, attempts, last error,
    times, and the history of earlier resends. `matched` counts every failed email (of
    `key`). Failed emails stay until resent, or until OUTBOX_RETENTION_DAYS after their
    failure.
    """
    return dead_letters.list_failed(services(), query)


def resend(path: EmailIdPath) -> EmailState:
    """Send a failed email again.

    It goes back in the queue with its attempts and its give-up age
    (DISPATCH_MAX_AGE_SECONDS) restarted; the earlier attempts stay in `history`. Only a
    failed email: any other, or one another request resent first, is a 409
    `email_not_failed` (of two concurrent resends, exactly one answers 202).
    """
    state = dead_letters.resend(services(), path.email_id)
    metrics.count_resends("one", 1)
    return state


def resend_all(request: ResendAllRequest) -> ResendResult:
    """Send every failed email again, or those of one `key`, or those failed before a time.

    One update: each matching email goes back in the queue as a single resend would put
    it. A second call requeues only what failed again since.
    """
    result = dead_letters.resend_all(services(), request)
    metrics.count_resends("bulk", result["requeued"])
    return result


def declare(api: Api) -> None:
    """Declare these routes on `api` (notification_handler's table).

    The bulk resend is `/email/failed/resend`, not `/email/resend`: a one-segment path
    under /email is also GET /email/<email_id>'s (a 422 there), which would make GET an
    undocumented method of it (the contract test's Allow check says so).
    """
    api.route(
        "GET",
        "/email",
        source="query",
        model=DeadLetterQuery,
        context=lambda config: {"list_max_limit": config.list_max_limit},
        answers={
            200: Answer(
                "One page of the failed emails, and how many there are.",
                DeadLetterPage,
                links={
                    "ResendNewest": Link(
                        "resend",
                        {"email_id": "$response.body#/data/list/0/id"},
                        "Send the newest failed email again.",
                    )
                },
            )
        },
        tag="email",
        params={
            "status": "Which emails: `failed`, the only status listed here.",
            "skip": "How many of the newest failures to pass over.",
            "limit": "How many to list (at most LIST_MAX_LIMIT).",
            "key": "Only emails of this notification key.",
        },
    )(failed_emails)
    api.route(
        "POST",
        "/email/<email_id>/resend",
        source="path",
        model=EmailIdPath,
        answers={202: Answer("Queued again: the email's state.", EmailState)},
        errors=(EmailNotFound, EmailNotFailed),
        tag="email",
        params={"email_id": "The failed email's id."},
    )(resend)
    api.route(
        "POST",
        "/email/failed/resend",
        source="body",
        model=ResendAllRequest,
        answers={200: Answer("How many failed emails were queued again.", ResendResult)},
        tag="email",
        body_example={"status": "failed", "key": "new_login"},
    )(resend_all)
