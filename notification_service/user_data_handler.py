"""HTTP handlers of a user's data: its export and its erasure (user_data.py).

Declared on notification_handler's route table (`declare(api)`), as
preference_handler's are, so that the same parsing, credentials and OpenAPI document
cover them. Both need an API key: a user token opens only the inbox routes.
"""

from __future__ import annotations

from . import user_data
from .api import Answer, Api
from .schemas import ErasureReport, UserDataQuery, UserExport
from .web import services

_PARAMS = {
    "user_id": "A user's id: the `_id` of their document, 24 hexadecimal characters.",
    "email": "The user's address, when the application has deleted its document (or to "
    "look for one more): emails sent to it without a user are theirs too.",
}


def export_user_data(query: UserDataQuery) -> UserExport:
    """Everything the service holds about a user (GDPR article 15).

    Their notifications (as /list shows them), preferences (as GET /preferences) and
    emails (as GET /email/{id}), found by their id and by their address: the one in
    their document, and `email`. Emails of another user to the same address are not
    theirs. An id the service holds nothing of answers an empty export with
    `user_document: false`, not a 404.
    """
    return user_data.export(services(), query.user_id, query.email)


def erase_user_data(query: UserDataQuery) -> ErasureReport:
    """Erase what the service holds about a user (GDPR article 17); say what, by kind.

    The notifications array and its counts; emails not sent yet are cancelled (an
    email in flight too: it ends cancelled, without its address), sent and failed
    ones deleted, so that their address is nowhere in the service's collections; the
    user's part of stored Idempotency-Key answers (a retry replays without it and
    creates nothing again). Preferences are kept (no address in them: an erasure must
    not subscribe again someone who opted out), as are the application's document and
    its fields. Idempotent: run again, every count is 0.
    """
    return user_data.erase(services(), query.user_id, query.email)


def declare(api: Api) -> None:
    """Declare these routes on `api` (notification_handler's table)."""
    api.route(
        "GET",
        "/users/<user_id>/export",
        source="query",
        model=UserDataQuery,
        answers={200: Answer("Everything the service holds about the user.", UserExport)},
        tag="users",
        params=_PARAMS,
    )(export_user_data)
    api.route(
        "DELETE",
        "/users/<user_id>/data",
        source="query",
        model=UserDataQuery,
        answers={200: Answer("What was removed, by kind.", ErasureReport)},
        tag="users",
        params=_PARAMS,
    )(erase_user_data)
