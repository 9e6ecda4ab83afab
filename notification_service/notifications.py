"""The domain: what creating, listing, reading and deleting notifications means.

Plain functions that take their collaborators (storage, outbox, templates, clock) in a
`Services` bundle, so tests pass real ones and may fake only the clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from .config import Config
from .digests import open_digests
from .email_templates import EmailContent, EmailTemplates
from .errors import (
    EmailNotFound,
    FanOutCutShort,
    UserDocumentInvalid,
    UserHasNoEmail,
    UserNotFound,
)
from .keys import KeySpec
from .outbox import Outbox
from .schemas import (
    Counts,
    CreateRequest,
    CreateResult,
    DeleteAllRequest,
    DeleteRequest,
    DeleteResult,
    EmailRequest,
    EmailState,
    FanOutOutcome,
    FanOutResult,
    InboxPage,
    ListQuery,
    ListRequestEcho,
    Notification,
    ReadAllRequest,
    ReadAllResult,
    Readiness,
    ReadRequest,
    UserQuery,
)
from .storage.idempotency_store import IdempotencyStore
from .storage.ids import IdBlock, new_id
from .storage.inbox_store import InboxStore, RefusedWrites, has_email
from .storage.mongo_connector import DatabaseUnavailable, Document
from .storage.preference_store import PreferenceStore
from .unsubscribe import unsubscribe_url

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


class Events(Protocol):
    """What the domain reports as it goes (metrics.py counts it): passed in, so that the
    domain imports no metrics."""

    def notifications_created(self, key: str, count: int) -> None: ...


class NoEvents:
    def notifications_created(self, key: str, count: int) -> None:
        return None


@dataclass(frozen=True)
class Services:
    config: Config
    store: InboxStore
    outbox: Outbox
    templates: EmailTemplates
    idempotency: IdempotencyStore
    preferences: PreferenceStore
    clock: Clock = utc_now
    events: Events = field(default_factory=NoEvents)


def create_notification(
    svc: Services, request: CreateRequest, ids: IdBlock, *, repeat: bool = False
) -> CreateResult:
    """Record and/or email a notification to one user as its key and the user's
    preferences say: the fan-out of one user, then the user's counts.

    `ids` are the request's ids; `repeat` says an earlier attempt with the same ids may
    have written part of it (a retried Idempotency-Key): each write then completes what
    is missing and doubles nothing.

    With a `collapse_key`, the user's unread notification of the same key and collapse
    key, if any, takes this one's place (InboxStore.append): the answer gives its id,
    with `collapsed` true, read with the counts (no extra command).

    `skipped` lists the channels not used for the user (their preferences); when every
    one is skipped nothing is written and the ids are null (the handler answers 200).

    :raise UserNotFound: unknown user outside test mode (EMAIL unset).
    :raise UserHasNoEmail: the key sends email and the user has no address; nothing written.
    :raise UserDocumentInvalid: the user's document cannot take a notification.
    """
    user_id = request.user_id
    assert user_id is not None  # the model requires user_id or user_ids
    spec = svc.config.keys.get(request.key)
    made = _Made(svc.clock())
    _create(svc, request, [user_id], ids, repeat, made)
    if user_id in made.refused:
        raise made.refused[user_id]
    mine = made.written.get(user_id)
    own_id = mine.notification_id if mine is not None else None
    counts = (
        svc.store.counts(
            user_id,
            svc.clock(),
            after_write=own_id is not None,
            kept_by=own_id if request.collapse_key is not None else None,
        )
        if spec.in_app
        else None
    )
    kept = counts["kept"] if counts and own_id else None
    if mine is not None and kept is not None and mine.digest:
        made.join_digests(svc, spec, {user_id: kept})
    return {
        "notification_id": (kept or own_id),
        "email_id": mine.email_id if mine is not None else None,
        "collapsed": kept is not None,
        "skipped": made.skipped.get(user_id, []),
        "elements": counts["elements"] if counts else None,
        "new": counts["new"] if counts else None,
    }


def fan_out(
    svc: Services, request: CreateRequest, ids: IdBlock, *, repeat: bool = False
) -> FanOutResult:
    """The notification for each of `request.user_ids`, built and written FAN_OUT_CHUNK
    users at a time (a bulk write for the records, one insert for the emails, each). A
    user that is missing, has no address (for a key that emails) or whose document
    cannot take notifications gets that outcome, one whose preferences turned off
    every channel `skipped`; the others are written all the same.

    :raise FanOutCutShort: the database stopped answering part way: says which users'
        writes were done (a retry with the same Idempotency-Key completes the others).
    """
    assert request.user_ids is not None
    spec = svc.config.keys.get(request.key)
    made = _Made(svc.clock())
    try:
        _create(svc, request, request.user_ids, ids, repeat, made)
    except DatabaseUnavailable as exc:
        raise FanOutCutShort([u for u in request.user_ids if u in made.written]) from exc
    outcomes: dict[str, FanOutOutcome] = {
        user_id: {"user_id": user_id, "status": error.code}
        for user_id, error in made.refused.items()
    }
    # Which users' creates collapsed, and into what: one more read per 50 users (the
    # write's answer does not say), only with a collapse key.
    recorded = {u: w.notification_id for u, w in made.written.items() if w.notification_id}
    kept = svc.store.kept_ids(recorded) if request.collapse_key is not None and recorded else {}
    made.join_digests(svc, spec, {u: k for u, k in kept.items() if made.written[u].digest})
    for user_id, channels in made.skipped.items():
        if user_id not in made.written:
            outcomes[user_id] = {"user_id": user_id, "status": "skipped", "skipped": channels}
    for user_id, written in made.written.items():
        outcomes[user_id] = {
            "user_id": user_id,
            "status": "created",
            "notification_id": kept.get(user_id, written.notification_id),
            "email_id": written.email_id,
            "collapsed": user_id in kept,
            "skipped": made.skipped.get(user_id, []),
        }
    results = [outcomes[user_id] for user_id in request.user_ids]
    totals = dict.fromkeys(FAN_OUT_STATUSES, 0)
    for outcome in results:
        totals[outcome["status"]] += 1
    return {"results": results, "totals": totals}


FAN_OUT_STATUSES = (
    "created",
    "skipped",
    "user_not_found",
    "user_has_no_email",
    "user_document_invalid",
)
# Users a fan-out builds and writes at a time: its memory holds one chunk's documents
# and rendered emails (not 1,000 users'), and a cut-short fan-out knows which chunks
# were written. One bulk write per chunk instead of one in all.
FAN_OUT_CHUNK = 250
Refusal = UserNotFound | UserHasNoEmail | UserDocumentInvalid


@dataclass(frozen=True)
class _Target:
    """One user's part of a create, while its chunk is written: what goes to them."""

    user_id: str
    notification: Notification
    email: Document | None  # the email queued with it (an `always` key)
    email_id: str
    record: bool  # stored in the user's array
    digest: bool  # put in the user's digest of the key (an `if_unread` key)


@dataclass(frozen=True)
class _Written:
    """What stays of a user's written part once its chunk is done: the ids it answers."""

    notification_id: str | None  # stored in the array
    email_id: str | None  # queued at once
    digest: bool


@dataclass
class _Made:
    """What `_create` did, filled chunk by chunk: the users written, why each refused
    one was not, and the channels skipped for each user whose preferences turned some
    off."""

    now: datetime
    written: dict[str, _Written] = field(default_factory=dict)
    refused: dict[str, Refusal] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    def join_digests(self, svc: Services, spec: KeySpec, kept: dict[str, str]) -> None:
        """Put the notifications these creates collapsed into in the users' digests: the
        create's own id, put there before its write, was never stored."""
        if kept:
            open_digests(svc.outbox, spec, list(kept.items()), self.now)


def _create(
    svc: Services,
    request: CreateRequest,
    user_ids: list[str],
    ids: IdBlock,
    repeat: bool,
    made: _Made,
) -> None:
    """The one path of every create: record, email or digest for each of `user_ids` as
    the key and the user's preferences say, an email only where its record is written;
    FAN_OUT_CHUNK users at a time, into `made`.

    The i-th user's notification and email ids are the block's ids 2i and 2i + 1.
    """
    spec = svc.config.keys.get(request.key)
    if svc.config.email is not None:
        # Test mode of the original assignment: the users are made first, so that
        # storing the notifications stays one update each.
        svc.store.ensure_users(user_ids, svc.config.email)
    before = len(made.written)
    for start in range(0, len(user_ids), FAN_OUT_CHUNK):
        chunk = range(start, min(start + FAN_OUT_CHUNK, len(user_ids)))
        _create_chunk(svc, request, spec, [(i, user_ids[i]) for i in chunk], ids, repeat, made)
    # Once done, so a retry of an attempt cut short counts it once (a crash between
    # here and the idempotency record may count it twice).
    svc.events.notifications_created(request.key, len(made.written) - before)


def _create_chunk(
    svc: Services,
    request: CreateRequest,
    spec: KeySpec,
    users: list[tuple[int, str]],
    ids: IdBlock,
    repeat: bool,
    made: _Made,
) -> None:
    now = made.now
    user_ids = [user_id for _, user_id in users]
    # A key that emails reads its users first: the address, the templates' fields, and
    # the preferences that decide what goes before anything is written (a digest is
    # opened before its notification is stored). A key that only records writes at
    # once: the user's preference is a condition of that write (`where`), and a write
    # that matched nothing is explained afterwards.
    read = svc.store.find_users(user_ids) if spec.emails else None
    where = (
        svc.preferences.in_app_allowed(spec.name) if spec.in_app and not spec.mandatory else None
    )
    targets: list[_Target] = []
    for i, user_id in users:
        notification = _notification(request, user_id, ids.id(2 * i), now)
        if read is None:
            targets.append(_Target(user_id, notification, None, ids.id(2 * i + 1), True, False))
            continue
        user = read.get(user_id)
        if user is None:
            made.refused[user_id] = UserNotFound()
            continue
        planned = _plan(svc, spec, notification, user, ids.id(2 * i + 1), made)
        if planned is not None:
            targets.append(planned)
    digests = [(t.user_id, t.notification["id"]) for t in targets if t.digest]
    if digests:
        open_digests(svc.outbox, spec, digests, now)  # before the push: see digests.py
    done: set[str] = set()
    for (record, email), group in _groups(targets).items():
        written, rejected = _write(svc, group, record, email, now, repeat, where)
        done |= written
        made.refused.update(rejected)
    for target in targets:
        if target.user_id in done:
            made.written[target.user_id] = _Written(
                target.notification["id"] if target.record else None,
                target.email_id if target.email is not None else None,
                target.digest,
            )
    unexplained = [t.user_id for t in targets if t.user_id not in done]
    unexplained = [u for u in unexplained if u not in made.refused]
    if unexplained and where is not None:
        # The write's preference condition may be why: read those users again.
        again = svc.store.find_users(unexplained)
        for user_id in unexplained:
            user = again.get(user_id)
            if user is not None and "in_app" in svc.preferences.opted_out(user, spec.name):
                made.skipped[user_id] = list(spec.channels)
    for user_id in unexplained:
        if user_id not in made.skipped:
            made.refused[user_id] = _why_not(
                svc, user_id, spec.email == "always", single=request.user_id is not None
            )


def _plan(
    svc: Services,
    spec: KeySpec,
    notification: Notification,
    user: Document,
    email_id: str,
    made: _Made,
) -> _Target | None:
    """One read user's part: the channels their preferences leave, and what each needs
    of their document. None when nothing goes to them (`made` says why)."""
    user_id = notification["user_id"]
    off = svc.preferences.skipped(user, spec)
    record = spec.in_app and "in_app" not in off
    email = spec.emails and "email" not in off
    if spec.email == "if_unread" and not (record and has_email(user)):
        # Nothing of theirs can be unread, or no address to send a digest to.
        email = False
    skipped = [
        c for c, used in (("in_app", record), ("email", email)) if c in spec.channels and not used
    ]
    if skipped:
        made.skipped[user_id] = skipped
    if not (record or email):
        return None
    problem = _problem(svc, user, record, email and spec.email == "always")
    if problem is not None:
        made.refused[user_id] = problem
        return None
    queued = None
    if email and spec.email == "always":
        queued = _notification_email(svc, spec, notification, user, stored=record)
    return _Target(
        user_id, notification, queued, email_id, record, email and spec.email == "if_unread"
    )


def _groups(targets: list[_Target]) -> dict[tuple[bool, bool], list[_Target]]:
    """The targets by what is written for them (record, queued email): one `_write` each."""
    groups: dict[tuple[bool, bool], list[_Target]] = {}
    for target in targets:
        groups.setdefault((target.record, target.email is not None), []).append(target)
    return groups


def _problem(svc: Services, user: Document, record: bool, needs_address: bool) -> Refusal | None:
    if record and not user["holds_array"]:
        return svc.store.not_an_array()
    if needs_address and not has_email(user):
        return UserHasNoEmail()
    return None


def _why_not(svc: Services, user_id: str, require_email: bool, *, single: bool) -> Refusal:
    """Why a user's write matched nothing: gone, or changed, since it was read (or, for
    a key that only records, never there). One user's create asks the database, to
    answer the exact error; a fan-out says `user_not_found`, as it was."""
    if single:
        return svc.store.why_not_appended(user_id, require_email=require_email)
    return UserNotFound()


def _write(
    svc: Services,
    targets: list[_Target],
    record: bool,
    email: bool,
    now: datetime,
    repeat: bool,
    where: Document | None = None,
) -> tuple[set[str], dict[str, UserDocumentInvalid]]:
    """Write the records and emails of `targets` so that no email is queued without its
    record; return the users that got theirs, and those whose document refused the
    write (with why).

    With transactions (a replica set), records and emails commit together. On a
    standalone server the emails are stored first as pending (never sent as such),
    then the records, then the emails of the records written are released. Cut short
    between them, a retry with the same Idempotency-Key completes the steps left;
    without one, the dispatcher's sweep releases a pending email whose notification
    was stored and drops one whose notification was not (the request failed as a
    whole, as a transaction would).
    """
    entries = [(t.user_id, t.notification) for t in targets]
    by_user = {t.user_id: t for t in targets}

    def queue(user_ids: set[str], *, pending: bool = False, session: Any = None) -> None:
        chosen = [t for t in targets if t.user_id in user_ids]
        svc.outbox.enqueue_many(
            [t.email for t in chosen if t.email is not None],  # all, for email keys
            now,
            email_ids=[t.email_id for t in chosen],
            pending=pending,
            session=session,
        )

    everyone = set(by_user)
    if not record:
        queue(everyone)
        return everyone, {}
    if not email:
        return svc.store.append(entries, now, require_email=False, repeat=repeat, where=where)
    email_ids = [t.email_id for t in targets]
    if svc.store.supports_transactions():
        refused: dict[str, UserDocumentInvalid] = {}
        for _ in range(3):
            kept = [(u, n) for u, n in entries if u not in refused]
            attempts = 0

            def both(session: Any, kept: list[tuple[str, Notification]] = kept) -> set[str]:
                nonlocal attempts
                attempts += 1
                if repeat or attempts > 1:
                    # A retried request, or the driver running this again after a
                    # commit whose answer was lost: the emails are there only if that
                    # earlier commit went through, records and all.
                    stored = svc.outbox.existing(email_ids, session=session)
                    if stored:
                        return {t.user_id for t in targets if t.email_id in stored}
                done, _ = svc.store.append(
                    kept, now, require_email=True, session=session, where=where
                )
                queue(done, session=session)
                return done

            try:
                return svc.store.in_transaction(both), refused
            except RefusedWrites as exc:
                # The server aborted the transaction: again, without those users.
                refused.update(exc.refused)
        raise UserDocumentInvalid("Users' documents kept refusing the notification.")
    queue(everyone, pending=True)
    done, refused = svc.store.append(entries, now, require_email=True, repeat=repeat, where=where)
    released = [by_user[u].email_id for u in done]
    if svc.outbox.activate(released, now) < len(released):
        # A sweep dropped some pending emails while this request (a late retry) was
        # still to store their notifications: queue those again.
        missing = set(released) - svc.outbox.existing(released)
        queue({u for u in done if by_user[u].email_id in missing})
    svc.outbox.discard_pending([by_user[u].email_id for u in everyone - done])
    return done, refused


def list_notifications(svc: Services, query: ListQuery) -> InboxPage:
    """The counts and one page of the user's notifications, newest first.

    :raise UserNotFound:
    """
    result = svc.store.inbox_page(
        query.user_id, query.skip, query.limit, svc.clock(), is_new=query.is_new, key=query.key
    )
    echo: ListRequestEcho = {"user_id": query.user_id, "skip": query.skip, "limit": query.limit}
    # The filters are echoed when given: a seed client sees the seed's echo exactly.
    if query.is_new is not None:
        echo["is_new"] = query.is_new
    if query.key is not None:
        echo["key"] = query.key
    return {
        "elements": result["elements"],
        "new": result["new"],
        "request": echo,
        "list": result["list"],
        "matched": result["matched"],
    }


def count(svc: Services, query: UserQuery) -> Counts:
    """The user's totals, from the stored counts.

    :raise UserNotFound:
    """
    return _counts(svc.store.counts(query.user_id, svc.clock()))


def inbox_state(svc: Services, user_id: str) -> Document:
    """The user's inbox as a stream shows it (InboxStore.feed_states).

    :raise UserNotFound:
    """
    state = svc.store.feed_states([user_id], svc.clock()).get(user_id)
    if state is None:
        raise UserNotFound()
    return state


def mark_read(svc: Services, request: ReadRequest) -> Counts:
    """Mark one notification read; idempotent. Returns the user's counts after it.

    :raise UserNotFound: / :raise NotificationNotFound:
    """
    return _counts(svc.store.mark_read(request.user_id, request.notification_id, svc.clock()))


def mark_all_read(svc: Services, request: ReadAllRequest) -> ReadAllResult:
    """Mark every notification read, or only `up_to` and the older ones.

    :raise UserNotFound: / :raise NotificationNotFound: `up_to` is not in the inbox.
    """
    result = svc.store.mark_all_read(request.user_id, request.up_to, svc.clock())
    return {"changed": result["changed"], **_counts(result)}


def delete(svc: Services, request: DeleteRequest) -> DeleteResult:
    """Remove one notification; one already gone is `deleted: 0`.

    :raise UserNotFound:
    """
    result = svc.store.delete(request.user_id, request.notification_id, svc.clock())
    return {"deleted": result["changed"], **_counts(result)}


def delete_all(svc: Services, request: DeleteAllRequest) -> DeleteResult:
    """Remove every notification, or only the read ones.

    :raise UserNotFound:
    """
    result = svc.store.delete_all(request.user_id, request.read, svc.clock())
    return {"deleted": result["changed"], **_counts(result)}


def queue_email(svc: Services, request: EmailRequest, ids: IdBlock) -> str:
    """Queue an email with the caller's own subject and text; return its id (the
    block's first: a retry with the same Idempotency-Key stores it once).

    :raise UserNotFound: / :raise UserHasNoEmail: when addressed by user_id.
    """
    to = request.to
    if request.user_id is not None:
        to = _address(svc.store.find_user(request.user_id))
    assert to is not None  # the model requires exactly one of user_id and to
    content = EmailContent(subject=request.subject, text=request.text, html=request.html)
    email = _email_record(svc, "custom", to, content, user_id=request.user_id)
    return svc.outbox.enqueue(email, svc.clock(), email_id=ids.id(0))


def readiness(svc: Services) -> Readiness:
    """Whether this process can serve: the database answers; and how the outbox is doing.

    :raise DatabaseUnavailable: the database did not answer within the deadline.
    """
    svc.store.ping()
    now = svc.clock()
    backlog = svc.outbox.backlog()
    oldest = svc.outbox.oldest_due(now)
    return {
        "status": "ready",
        "outbox": {
            "queued": backlog["queued"],
            "sending": backlog["sending"],
            "scheduled": backlog["scheduled"],
            "oldest_due_seconds": None
            if oldest is None
            else round((now - oldest).total_seconds(), 3),
        },
    }


def email_state(svc: Services, email_id: str) -> EmailState:
    """The delivery state of one queued email.

    :raise EmailNotFound:
    """
    record = svc.outbox.get(email_id)
    if record is None:
        raise EmailNotFound()
    return email_view(record)


def email_view(record: Document) -> EmailState:
    """What GET /email/<id> shows of an outbox record (also in a user's export, and
    each dead letter listed)."""
    status = record["status"]
    due = status in ("queued", "scheduled")
    return {
        "id": str(record["_id"]),
        "status": status,
        # A digest has no content until its due time (digests.py).
        "to": record.get("to"),
        "subject": record.get("subject"),
        "kind": record.get("kind", "notification"),
        "user_id": record.get("user_id"),
        "notification_id": record.get("notification_id"),
        "notification_ids": _distinct(record.get("notification_ids")),
        "key": record.get("key"),
        "message_id": record.get("message_id"),
        "attempts": record["attempts"],
        "created_at": _iso(record["created_at"]) or "",
        # For a claimed record this field holds the lease's end: not a time to show.
        "next_attempt_at": _iso(record["next_attempt_at"]) if due else None,
        "sent_at": _iso(record.get("sent_at")),
        "failed_at": _iso(record.get("failed_at")),
        "cancelled_at": _iso(record.get("cancelled_at")),
        "cancel_reason": record.get("cancel_reason"),
        "last_error": record.get("last_error"),
        "requeued_at": _iso(record.get("requeued_at")),
        "history": [
            {
                "attempts": earlier["attempts"],
                "last_error": earlier.get("last_error"),
                "failed_at": _iso(earlier.get("failed_at")),
            }
            for earlier in record.get("history", [])
        ],
    }


def _distinct(ids: list[str] | None) -> list[str] | None:
    """A digest's ids once each, in the order they first joined (Outbox keeps a repeat)."""
    return None if ids is None else list(dict.fromkeys(ids))


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _address(user: Document) -> str:
    # Same rule as the storage query that guards the record (a non-empty string), so a
    # create is refused before anything is written. A malformed address is the SMTP
    # server's to judge: it ends as a failed outbox record, visible at GET /email/<id>.
    if not has_email(user):
        raise UserHasNoEmail()
    address: str = user["email"]
    return address


def _counts(state: Document) -> Counts:
    return {"elements": state["elements"], "new": state["new"]}


def _notification(
    request: CreateRequest, user_id: str, notification_id: str, now: datetime
) -> Notification:
    return {
        "id": notification_id,
        "timestamp": int(now.timestamp()),
        "is_new": True,
        "user_id": user_id,
        "key": request.key,
        "target_id": request.target_id,
        "data": request.data,
        "count": 1,
        "collapse_key": request.collapse_key,
    }


def message_id(config: Config) -> str:
    """A globally unique Message-ID, fixed at enqueue so that every retry carries it."""
    domain = config.smtp_email.rpartition("@")[2] or "localhost"
    return f"<{new_id()}.notification-service@{domain}>"


def _notification_email(
    svc: Services, spec: KeySpec, notification: Notification, user: Document, *, stored: bool
) -> Document:
    """The outbox record of a notification's email, rendered for `user`, with the
    one-click unsubscribe link of a key that is not mandatory; it names the notification
    only when that is `stored` in the user's array (an email-only key's is not).

    :raise UserHasNoEmail:
    """
    address = _address(user)
    link = unsubscribe_url(svc.config, notification["user_id"], spec.name)
    content = svc.templates.render(spec.name, [notification], user, unsubscribe_url=link)
    record = _email_record(
        svc,
        "notification",
        address,
        content,
        user_id=notification["user_id"],
        notification_id=notification["id"] if stored else None,
        key=notification["key"],
    )
    record["unsubscribe_url"] = link
    return record


def _email_record(
    svc: Services,
    kind: str,
    to: str,
    content: EmailContent,
    *,
    user_id: str | None,
    notification_id: str | None = None,
    key: str | None = None,
) -> Document:
    """The one place that says what an outbox record holds."""
    return {
        "kind": kind,
        "to": to,
        "subject": content.subject,
        "text": content.text,
        "html": content.html,
        "message_id": message_id(svc.config),
        "user_id": user_id,
        "notification_id": notification_id,
        "key": key,
    }
