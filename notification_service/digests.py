"""Email if unread: a key's notifications gathered in one digest, sent at due time only
if some are still unread; and the send-time preference check of every email.

A digest is an outbox record (outbox.py) opened by the first notification of its user
and key and joined by the later ones (`open_digest`, called by the create path BEFORE
its push: a crash in between leaves an id that is never found, so no transaction is
needed). At due time a dispatcher claims it like any email and hands its claim to
`Digests.prepare`, which reads the users once and, for each digest, writes the
rendered content into the record (then sent as any email, a retry sending exactly that)
or cancels it with the reason:

- `user_not_found`, `user_has_no_email`: nowhere to send it;
- `unsubscribed`: the user turned the key's email off (a mandatory key ignores it);
- `nothing_unread`: every notification of the batch was read, deleted, or expired
  (or never stored: the crash above).

Every other claimed record of a non-mandatory key is checked against the preferences
too, one read per key and claim, so a change before an email goes out stops it.
"""

from __future__ import annotations

import functools
import logging
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from .config import Config
from .email_templates import EmailTemplates
from .keys import KeySpec, KeyTable
from .outbox import CancelReason, Outbox
from .schemas import Notification
from .storage.digest_outbox import DIGEST
from .storage.digest_store import UNREAD, DigestStore
from .storage.inbox_store import has_email
from .storage.mongo_connector import Document
from .unsubscribe import unsubscribe_url

log = logging.getLogger(__name__)


class Preferences(Protocol):
    """PreferenceStore's part the dispatcher uses."""

    def email_allowed(self, user_ids: list[str], key: str) -> set[str]:
        """Which of `user_ids` have not turned `key`'s email off (one read)."""
        ...

    def opted_out(self, user_doc: Document, key: str) -> set[str]:
        """The channels of `key` the user (an already-read document) turned off."""
        ...


def open_digest(
    outbox: Outbox, spec: KeySpec, user_id: str, notification_id: str, now: datetime
) -> str | None:
    """Put a notification of an `if_unread` key in the user's digest, opening one due
    `spec.email_after_seconds` from `now` if none is open; return the digest's id when
    this opened it, None when it joined one (DigestOutbox.schedule_digest).

    Call it BEFORE pushing the notification: a crash between leaves an id the due-time
    step never finds (nothing sent for it), never a notification without its email.
    """
    return outbox.digests.schedule_digest(
        user_id, spec.name, notification_id, now, spec.email_after_seconds
    )


def open_digests(
    outbox: Outbox, spec: KeySpec, entries: list[tuple[str, str]], now: datetime
) -> dict[str, str]:
    """`open_digest` for a fan-out's (user_id, notification_id) pairs, one bulk write;
    returns the digests it opened, by user id. Before the fan-out's push, likewise."""
    return outbox.digests.schedule_digests(entries, spec.name, now, spec.email_after_seconds)


@dataclass(frozen=True)
class Digests:
    """The due-time step of a claim (`prepare`), with what it needs.

    `unsubscribe_url(user_id, key)`: the link of a non-mandatory key's email, or None
    (unsubscribe.unsubscribe_url with the config bound). `sender_domain`: the domain of
    a digest's Message-ID (SMTP_EMAIL's).
    """

    outbox: Outbox
    users: DigestStore
    templates: EmailTemplates  # a digest is render(key, the unread ones, user)
    keys: KeyTable
    preferences: Preferences
    unsubscribe_url: Callable[[str, str], str | None]
    sender_domain: str

    @classmethod
    def of(
        cls, config: Config, outbox: Outbox, templates: EmailTemplates, preferences: Preferences
    ) -> Digests:
        """The due-time step of a process, from its services."""
        return cls(
            outbox=outbox,
            users=DigestStore(outbox.records.database, config),
            templates=templates,
            keys=config.keys,
            preferences=preferences,
            unsubscribe_url=functools.partial(unsubscribe_url, config),
            sender_domain=config.smtp_email.rpartition("@")[2] or "localhost",
        )

    def prepare(self, records: list[Document], now: datetime) -> list[Document]:
        """The claimed records to send, in order, each with its content: digests
        rendered now (written into their record first) and no record whose user turned
        its key's email off; the others are cancelled with their reason.

        :raise DatabaseUnavailable: nothing is lost: what was not settled is still
            claimed, and given back (or taken over after the lease) as usual.
        """
        cancels: dict[tuple[str, CancelReason], list[Any]] = defaultdict(list)
        due = [r for r in records if r.get("kind") == DIGEST and "to" not in r]
        rendered = self._render(due, now, cancels)
        settled = {r["_id"] for r in due}
        self._check_preferences([r for r in records if r["_id"] not in settled], now, cancels)
        kept = self.outbox.digests.write_digests(
            [(r["_id"], r["claimed_by"], fields) for r, fields in rendered.values()]
        )
        for (token, reason), ids in cancels.items():
            self.outbox.cancel(ids, token, reason, now)
            log.info("%d email(s) cancelled: %s", len(ids), reason)
        cancelled = {email_id for ids in cancels.values() for email_id in ids}
        ready = []
        for record in records:
            if record["_id"] in cancelled:
                continue
            if record["_id"] in rendered:
                if record["_id"] not in kept:
                    continue  # the claim ran out first: its new holder renders it
                record = {**record, **rendered[record["_id"]][1]}
            ready.append(record)
        return ready

    def _mandatory(self, key: Any) -> bool:
        return isinstance(key, str) and self.keys.mandatory(key)

    def _render(
        self,
        due: list[Document],
        now: datetime,
        cancels: dict[tuple[str, CancelReason], list[Any]],
    ) -> dict[Any, tuple[Document, Document]]:
        """The content of each digest that goes out, by id; the others in `cancels`."""
        if not due:
            return {}
        batches: dict[str, list[str]] = defaultdict(list)
        for record in due:
            batches[record["user_id"]].extend(record.get("notification_ids", []))
        users = self.users.unread(batches, now)
        rendered: dict[Any, tuple[Document, Document]] = {}
        for record in due:
            key, user = record["key"], users.get(record["user_id"])
            reason: CancelReason | None = None
            if user is None:
                reason = "user_not_found"
            elif not has_email(user):
                reason = "user_has_no_email"
            elif not self._mandatory(key) and "email" in self.preferences.opted_out(user, key):
                reason = "unsubscribed"
            else:
                batch = set(record.get("notification_ids", []))
                unread: list[Notification] = [n for n in user[UNREAD] if n["id"] in batch]
                if not unread:
                    reason = "nothing_unread"
                else:
                    try:
                        rendered[record["_id"]] = (record, self._content(record, user, unread))
                    except Exception:
                        # A key no longer emailing, a template failing on this data: left
                        # without content, the dispatcher fails it for good ("cannot
                        # build message") instead of the whole claim failing again
                        # at every retry.
                        log.exception("digest %s: cannot be rendered", record["_id"])
            if reason is not None:
                cancels[record["claimed_by"], reason].append(record["_id"])
        return rendered

    def _content(self, record: Document, user: Document, unread: list[Notification]) -> Document:
        key = record["key"]
        url = None if self._mandatory(key) else self.unsubscribe_url(record["user_id"], key)
        shown = {k: v for k, v in user.items() if k != UNREAD}
        content = self.templates.render(key, unread, shown, unsubscribe_url=url)
        return {
            "to": user["email"],
            "subject": content.subject,
            "text": content.text,
            "html": content.html,
            "unsubscribe_url": url,
            # From the digest's own id: unique, and the same if it is ever rendered again.
            "message_id": f"<{record['_id']}.digest.notification-service@{self.sender_domain}>",
        }

    def _check_preferences(
        self,
        records: list[Document],
        now: datetime,
        cancels: dict[tuple[str, CancelReason], list[Any]],
    ) -> None:
        """Cancel the records of users who turned their key's email off (one read per
        key of the claim), or whose document is gone (`user_not_found`, as a digest's:
        one more read, only when some were refused)."""
        by_key: dict[str, list[Document]] = defaultdict(list)
        for record in records:
            key, user_id = record.get("key"), record.get("user_id")
            if isinstance(user_id, str) and isinstance(key, str) and not self._mandatory(key):
                by_key[key].append(record)
        refused: list[Document] = []
        for key, chosen in by_key.items():
            allowed = self.preferences.email_allowed(sorted({r["user_id"] for r in chosen}), key)
            refused += [record for record in chosen if record["user_id"] not in allowed]
        if not refused:
            return
        found = self.users.unread({r["user_id"]: [] for r in refused}, now)
        for record in refused:
            gone = record["user_id"] not in found
            reason: CancelReason = "user_not_found" if gone else "unsubscribed"
            cancels[record["claimed_by"], reason].append(record["_id"])
