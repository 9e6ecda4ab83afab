"""HTTP handlers of preferences and one-click unsubscribe links (RFC 8058).

Declared on notification_handler's route table (`declare(api)`), so that the same
parsing, credentials and OpenAPI document cover them; each view calls one function of
preferences.py.

`/unsubscribe/<token>` is open: the token is the credential. A GET shows a page and
changes nothing (mail scanners and link previews fetch every link of a message); its
button, or a mail provider's one-click, POSTs `List-Unsubscribe=One-Click`.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jinja2
from flask import Response

from . import preferences
from .api import Answer, Api
from .errors import InvalidUnsubscribeToken, MandatoryKey, UserDocumentInvalid, UserNotFound
from .schemas import (
    Preferences,
    PreferencesUpdate,
    UnsubscribeForm,
    UnsubscribePath,
    UserQuery,
)
from .web import services

_PAGES = Path(__file__).parent / "templates" / "pages"
# The page runs no script and loads nothing; its one form posts back to itself.
_PAGE_POLICY = "default-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
_TOKEN = "The token of an unsubscribe link, as the email's List-Unsubscribe header gives it."
_TITLES = {
    "confirm": "Unsubscribe",
    "unsubscribed": "Unsubscribed",
    "resubscribed": "Subscribed again",
    "mandatory": "Cannot unsubscribe",
}


def get_preferences(query: UserQuery) -> Preferences:
    """A user's preferences: every key, with the channels it uses.

    `in_app` and `email` are listed for the channels the key uses, true unless the user
    turned them off; a `mandatory` key always shows them on.
    """
    return preferences.get(services(), query.user_id)


def update_preferences(request: PreferencesUpdate) -> Preferences:
    """Turn channels of keys on or off; those not given stay as they are.

    Answers every key, as GET /preferences does. A key the service does not have, or a
    channel its key does not use, is a 422 `validation_failed`; turning off a mandatory
    key is a 422 `mandatory_key` naming it. Nothing is written then.
    """
    return preferences.put(services(), request)


def unsubscribe_page(path: UnsubscribePath) -> Response:
    """The page of an unsubscribe link: a button that unsubscribes. Changes nothing.

    Mail scanners fetch the links of a message, so only the POST acts. No API key.
    """
    link = preferences.read_link(services(), path.token)
    return _page("mandatory" if link.mandatory else "confirm", link.key)


def unsubscribe(path: UnsubscribePath, form: UnsubscribeForm) -> Response:
    """One-click unsubscribe (RFC 8058): the link's key sends its user no more email.

    The form body `List-Unsubscribe=One-Click` (urlencoded or multipart, as mail
    providers send it; no API key, no cookie) turns the email off, and `undo=1` on
    again. Both are idempotent and answer 200 with a small page, the first offering the
    undo; a user whose document is gone gets the same answer. A link whose token was
    altered is a 403 `invalid_unsubscribe_token`.
    """
    svc = services()
    if form.undo is not None:
        link = preferences.resubscribe(svc, path.token)
        return _page("resubscribed", link.key)
    link = preferences.unsubscribe(svc, path.token)
    return _page("unsubscribed", link.key)


def declare(api: Api) -> None:
    """Declare these routes on `api` (notification_handler's table)."""
    user_id = "A user's id: the `_id` of their document, 24 hexadecimal characters."
    api.route(
        "GET",
        "/preferences",
        auth="key_or_token",
        source="query",
        model=UserQuery,
        answers={200: Answer("Every key, with the user's channels.", Preferences)},
        errors=(UserNotFound,),
        tag="preferences",
        params={"user_id": user_id},
    )(get_preferences)
    api.route(
        "PUT",
        "/preferences",
        auth="key_or_token",
        source="body",
        model=PreferencesUpdate,
        answers={200: Answer("Every key, with the user's channels after the change.", Preferences)},
        errors=(UserNotFound, MandatoryKey, UserDocumentInvalid),
        tag="preferences",
        body_example={
            "user_id": "6756b2f1a4c3e0d9b8f71234",
            "keys": {"new_post": {"in_app": False}},
        },
    )(update_preferences)
    page = "A small HTML page (no script); its button POSTs to the same URL."
    api.route(
        "GET",
        "/unsubscribe/<token>",
        source="path",
        model=UnsubscribePath,
        answers={200: Answer(page, media_types=("text/html",), envelope=False)},
        errors=(InvalidUnsubscribeToken,),
        tag="preferences",
        auth="open",
        uses_database=False,
        params={"token": _TOKEN},
    )(unsubscribe_page)
    api.route(
        "POST",
        "/unsubscribe/<token>",
        source="path",
        model=UnsubscribePath,
        form=UnsubscribeForm,
        answers={200: Answer(page, media_types=("text/html",), envelope=False)},
        errors=(InvalidUnsubscribeToken, MandatoryKey, UserDocumentInvalid),
        tag="preferences",
        auth="open",
        params={"token": _TOKEN},
    )(unsubscribe)


def _page(state: str, key: str) -> Response:
    html = _template().render(state=state, key=key, title=_TITLES[state])
    return protect_link(Response(html, mimetype="text/html"))


# Where a link's URL starts (the app's own paths, after any proxy prefix).
LINK_PREFIX = "/unsubscribe/"


def protect_link(response: Response) -> Response:
    """The headers of every answer at a link's URL, its page's and any error's (the
    server's after-request hook adds them to those it did not make here)."""
    response.headers["Content-Security-Policy"] = _PAGE_POLICY
    # Beside CSP's frame-ancestors, for browsers that read only the older header: no
    # other site may frame the button and trick a click.
    response.headers["X-Frame-Options"] = "DENY"
    # The URL is the credential: no cache keeps it, no Referer carries it elsewhere.
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers["X-Robots-Tag"] = "noindex"
    return response


@functools.cache
def _template() -> jinja2.Template:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_PAGES),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env.get_template("unsubscribe.html")
