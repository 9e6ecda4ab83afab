"""MongoDB access: the client, the users' notification arrays, and database error handling.

The only module (with outbox.py) that imports pymongo. Every call is bounded by the
client-side operation timeout (DB_TIMEOUT_MS), and every driver error that means "the
database did not answer" becomes DatabaseUnavailable (which the web layer answers with
503), so no request hangs and no background loop mistakes an outage for a bug.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pymongo
from bson import ObjectId
from pymongo import MongoClient, ReturnDocument, uri_parser
from pymongo.collection import Collection
from pymongo.database import Database
from pymongo.errors import (
    ConnectionFailure,
    DuplicateKeyError,
    OperationFailure,
    PyMongoError,
)

from .config import Config, ConfigError
from .errors import (
    NotificationNotFound,
    UserDocumentInvalid,
    UserHasNoEmail,
    UserNotFound,
)
from .schemas import Notification

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

Document = dict[str, Any]
_BAD_VALUE = 2  # e.g. "$push: the field must be an array"
_TOO_LARGE = frozenset({10334, 17419, 17420})  # the document would pass 16 MB
_BAD_DATABASE_CHARS = frozenset('/\\. "$\0')


def new_id() -> str:
    """A fresh ObjectId as 24 lowercase hex characters."""
    return str(ObjectId())


class IdBlock:
    """The ids one request writes, all derived from one seed.

    A request that is retried with its Idempotency-Key after it was cut short (a crash,
    an outage) runs again with the same seed, so it writes the records it may already
    have written under the same ids, and each write can tell it is a repeat. The seed
    is an ObjectId of its own: the time, five random bytes drawn for this block (not the
    process's, so the block never meets an id `ObjectId()` makes), a counter from 0.
    """

    def __init__(self, seed: str | None = None) -> None:
        if seed is None:
            stamp = int(time.time()).to_bytes(4, "big")
            seed = (stamp + os.urandom(5) + bytes(3)).hex()
        self.seed = seed
        self._prefix = bytes.fromhex(seed)[:9]

    def id(self, n: int) -> str:
        """The n-th id of the block (0 <= n < 2**24), 24 lowercase hex characters."""
        if not 0 <= n < 2**24:
            raise ValueError(f"id {n} is outside the block")
        return (self._prefix + n.to_bytes(3, "big")).hex()


class DatabaseUnavailable(Exception):
    """The database did not answer in time (down, unreachable, or past the deadline).

    A storage-level fact, not an HTTP one: server.py answers it with 503 and a
    Retry-After, the dispatcher waits and tries again.
    """


def guarded(func: Callable[P, R]) -> Callable[P, R]:
    """Turn "the database did not answer" into DatabaseUnavailable; let real bugs through."""

    @functools.wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except PyMongoError as exc:
            # ConnectionFailure covers refused, reset, server selection and network
            # timeouts; `timeout` covers the client-side operation timeout (CSOT).
            if isinstance(exc, ConnectionFailure) or exc.timeout:
                log.warning("database unavailable in %s: %s", func.__qualname__, exc)
                raise DatabaseUnavailable(str(exc)) from exc
            raise

    return wrapper


def check_uri(config: Config) -> None:
    """Refuse a DB_URI the driver would refuse later, without connecting.

    :raise ConfigError: naming DB_URI.
    """
    uri = config.db_uri or ""
    try:
        if uri.startswith("mongodb+srv://"):
            # parse_uri would resolve the SRV record (DNS) right here; leave that to the
            # client, which retries it within its timeouts.
            if not urlsplit(uri).hostname:
                raise ValueError("no host name")
        else:
            uri_parser.parse_uri(uri)
    except (PyMongoError, ValueError) as exc:
        raise ConfigError(f"DB_URI: {exc}") from None
    name = config.database_name
    if len(name.encode()) > 63 or any(c in _BAD_DATABASE_CHARS for c in name):
        raise ConfigError(
            f'DB_URI: {name!r} is not a database name (at most 63 bytes, none of / \\ . space " $)'
        )


def connect(config: Config) -> MongoClient[Document]:
    """Create the process's one client. Call it after fork: pymongo is not fork-safe.

    :raise ConfigError: DB_URI unset or malformed.
    """
    if not config.db_uri:
        raise ConfigError("DB_URI: must be set (make run starts an embedded server without it)")
    check_uri(config)
    timeout = config.db_timeout_ms
    # Every write, on every path (records, outbox inserts, claims, outcomes), waits
    # until it is in the journal of a majority of the replica set (of the one node,
    # on a standalone server), so nothing a 2xx answer or a recorded send depends on
    # is lost to a crash or a failover. Set once on the client: every collection
    # inherits it. A DB_URI that gives `w` or `journal` itself is followed instead
    # (keyword arguments would override the URI). retryWrites stays the driver's
    # default (on) unless DB_URI says otherwise; README "Guarantees" says when to.
    given = {name.lower() for name, _ in parse_qsl(urlsplit(config.db_uri).query)}
    durable: dict[str, Any] = {} if given & {"w", "journal"} else {"w": "majority", "journal": True}
    return MongoClient(
        config.db_uri,
        appname="notification-service",
        tz_aware=True,
        # One budget for the whole operation (selection, connect, round trip), so a
        # frozen server costs a request at most DB_TIMEOUT_MS before a 503.
        timeoutMS=timeout,
        serverSelectionTimeoutMS=timeout,
        connectTimeoutMS=min(timeout, 2000),
        connect=False,
        **durable,
    )


def database(client: MongoClient[Document], config: Config) -> Database[Document]:
    return client[config.database_name]


class InboxStore:
    """The users collection: notifications live in an array inside each user's document."""

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.users: Collection[Document] = db[config.users_collection]
        self.field = config.notifications_field
        self.limit = config.notifications_limit

    def _push(self, notification: Notification) -> Document:
        # Newest first and capped in one atomic update: concurrent creates for one user
        # lose nothing but what the cap drops.
        return {
            "$push": {self.field: {"$each": [notification], "$position": 0, "$slice": self.limit}}
        }

    @guarded
    def append_capped(
        self,
        user_id: str,
        notification: Notification,
        *,
        require_email: bool,
    ) -> Document | None:
        """Prepend `notification` to the user's capped array: one update.

        With `require_email`, return the user (without the array) as the email needs
        it; otherwise return None after a plain update, the cheapest form on any server
        (on SecantusDB find_one_and_update costs ~15 ms against ~1.5 ms; bench/README.md).

        :raise UserNotFound: no such user.
        :raise UserHasNoEmail: `require_email` and the user has no email; nothing written.
        """
        with self._refusals_of_the_document():
            oid = ObjectId(user_id)
            query = self._user_query(oid, require_email)
            update = self._push(notification)
            if require_email:
                user = self.users.find_one_and_update(
                    query, update, projection={self.field: 0}, return_document=ReturnDocument.AFTER
                )
                if user is not None:
                    return user
            elif self.users.update_one(query, update).matched_count:
                return None
            raise self._why_missing(oid)

    @guarded
    def ensure_user(self, user_id: str, email: str) -> None:
        """Create the user as a profile with `email` unless it exists (test mode, EMAIL).

        An existing document is left exactly as it is, whatever its email.
        """
        # DuplicateKeyError: two upserts raced and the other one created it, as wanted.
        with contextlib.suppress(DuplicateKeyError):
            self.users.update_one(
                {"_id": ObjectId(user_id)},
                {"$setOnInsert": {"email": email, self.field: []}},
                upsert=True,
            )

    @contextlib.contextmanager
    def _refusals_of_the_document(self) -> Iterator[None]:
        """Turn the server refusing the user's document into UserDocumentInvalid (409).

        The users collection is the application's: its document may hold something
        other than an array in our field, or be at MongoDB's 16 MB limit.
        """
        try:
            yield
        except OperationFailure as exc:  # WriteError, or findAndModify's failure
            if exc.code == _BAD_VALUE:
                raise UserDocumentInvalid(
                    f"The user's {self.field!r} field is not an array.",
                    details=[{"field": self.field, "problem": "is not an array"}],
                ) from exc
            if exc.code in _TOO_LARGE:
                raise UserDocumentInvalid(
                    "The user's document is too large to take another notification."
                ) from exc
            raise

    @guarded
    def find_user(self, user_id: str) -> Document:
        """The user (without notifications).

        :raise UserNotFound:
        """
        user = self.users.find_one({"_id": ObjectId(user_id)}, projection={self.field: 0})
        if user is None:
            raise UserNotFound()
        return user

    @guarded
    def has_notification(self, user_id: str, notification_id: str) -> bool:
        """Whether the user's array holds the notification (the sweep of pending emails)."""
        query = {"_id": ObjectId(user_id), f"{self.field}.id": notification_id}
        return self.users.find_one(query, projection={"_id": 1}) is not None

    @guarded
    def inbox_page(self, user_id: str, skip: int, limit: int) -> Document:
        """Counts and one page, newest first, in one round trip.

        :raise UserNotFound: no such user.
        """
        # A document whose field is missing or not an array lists as empty.
        items = {"$cond": [{"$isArray": f"${self.field}"}, f"${self.field}", []]}
        # $slice's count must be positive, so a zero limit asks for the counts alone.
        # $slice takes 32-bit arguments; no array is anywhere near that long, so a
        # larger skip gives the same (empty) page instead of a server error.
        position = min(skip, 2**31 - 1)
        page: Any = {"$slice": [items, position, limit]} if limit > 0 else {"$literal": []}
        pipeline = [
            {"$match": {"_id": ObjectId(user_id)}},
            {
                "$project": {
                    "_id": 0,
                    "elements": {"$size": items},
                    "new": {
                        "$size": {
                            "$filter": {
                                "input": items,
                                "as": "n",
                                "cond": {"$eq": ["$$n.is_new", True]},
                            }
                        }
                    },
                    "list": page,
                }
            },
        ]
        for result in self.users.aggregate(pipeline):
            return result
        raise UserNotFound()

    @guarded
    def mark_read(self, user_id: str, notification_id: str) -> None:
        """Set is_new to false; reading a read notification is a success too.

        :raise UserNotFound: / :raise NotificationNotFound:
        """
        oid = ObjectId(user_id)
        # update_one, not find_one_and_update: SecantusDB refuses the positional `$` in
        # find_one_and_update, and both it and mongod accept this form.
        result = self.users.update_one(
            {"_id": oid, f"{self.field}.id": notification_id},
            {"$set": {f"{self.field}.$.is_new": False}},
        )
        if result.matched_count:
            return
        if self.users.find_one({"_id": oid}, projection={"_id": 1}) is None:
            raise UserNotFound()
        raise NotificationNotFound()

    def _user_query(self, oid: ObjectId, require_email: bool) -> Document:
        query: Document = {"_id": oid}
        if require_email:
            query["email"] = {"$type": "string", "$ne": ""}
        return query

    def _why_missing(self, oid: ObjectId) -> UserNotFound | UserHasNoEmail:
        exists = self.users.find_one({"_id": oid}, projection={"_id": 1}) is not None
        return UserHasNoEmail() if exists else UserNotFound()


# --- Idempotency-Key records --------------------------------------------------------

ClaimOutcome = Literal["claimed", "taken_over", "replay", "reused", "in_use"]
_INDEX_OPTIONS_CONFLICT = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict
_CLAIM_ATTEMPTS = 3


def _millis(moment: datetime) -> datetime:
    # BSON dates hold milliseconds: a lease written with microseconds would never equal
    # the value read back, and the conditional updates below match on equality.
    return moment.replace(microsecond=moment.microsecond - moment.microsecond % 1000)


@dataclass(frozen=True)
class KeyClaim:
    """What `IdempotencyStore.claim` found for one key.

    claimed / taken_over: this request holds the key; run it with `seed`'s ids, and
    finish with `complete`, `forget` or `release` (each conditional on `lease_until`).
    replay: the first answer, `status` and `body`. reused: the key holds another body.
    in_use: another request holds the key until `lease_until`.
    """

    outcome: ClaimOutcome
    key: str
    seed: str = ""
    lease_until: datetime | None = None
    status: int = 0
    body: Any = None


class IdempotencyStore:
    """Idempotency-Key records, one per scoped key, under the unique `_id`.

    `{_id: "<scope> <key>", fingerprint, state: "running"|"done", seed, lease_until,
    created_at, status?, body?}`. The unique `_id` makes the claim one insert that only
    one request can win, in any process; a TTL index on `created_at` forgets the key
    after IDEMPOTENCY_TTL_HOURS.
    """

    def __init__(self, db: Database[Document], config: Config) -> None:
        self.records: Collection[Document] = db[config.idempotency_collection]
        self.db = db
        self.ttl_seconds = config.idempotency_ttl_hours * 3600
        # A holder past this can no longer write (server.py's deadline), so its key may
        # be taken over without two requests writing at once.
        self.lease_seconds = config.write_window_seconds
        self._indexed = False

    @guarded
    def ensure_indexes(self) -> None:
        """The TTL index on `created_at`; an existing one with another TTL is changed."""
        try:
            self.records.create_index(
                "created_at", name="expires", expireAfterSeconds=self.ttl_seconds
            )
        except OperationFailure as exc:
            # The index exists with the old IDEMPOTENCY_TTL_HOURS: collMod changes it in
            # place (dropping it would leave the keys unexpired meanwhile).
            if exc.code not in _INDEX_OPTIONS_CONFLICT:
                raise
            self.db.command(
                "collMod",
                self.records.name,
                index={"name": "expires", "expireAfterSeconds": self.ttl_seconds},
            )
        self._indexed = True

    @guarded
    def claim(self, key: str, fingerprint: str, now: datetime) -> KeyClaim:
        """Claim `key` for a request whose body hashes to `fingerprint`, or say why not.

        A running record whose lease is over was left by a request cut short (a crash,
        a 503 between two writes): it is taken over, keeping its seed, by a conditional
        update that only one request can win.
        """
        if not self._indexed:
            # The database was down at start-up: without the TTL index no key would
            # ever be forgotten. (Two threads may both create it; that is harmless.)
            self.ensure_indexes()
        lease_until = _millis(now + timedelta(seconds=self.lease_seconds))
        for _ in range(_CLAIM_ATTEMPTS):
            seed = IdBlock().seed
            try:
                self.records.insert_one(
                    {
                        "_id": key,
                        "fingerprint": fingerprint,
                        "state": "running",
                        "seed": seed,
                        "lease_until": lease_until,
                        "created_at": _millis(now),
                    }
                )
                return KeyClaim("claimed", key, seed, lease_until)
            except DuplicateKeyError:
                pass
            record = self.records.find_one({"_id": key})
            if record is None:
                continue  # expired (TTL) or forgotten after a 4xx since the insert: again
            if record["fingerprint"] != fingerprint:
                return KeyClaim("reused", key)
            if record["state"] == "done":
                return KeyClaim("replay", key, status=record["status"], body=record["body"])
            held_until: datetime = record["lease_until"]
            if held_until > now:
                return KeyClaim("in_use", key, lease_until=held_until)
            won = self.records.update_one(
                {"_id": key, "state": "running", "lease_until": held_until},
                {"$set": {"lease_until": lease_until}},
            )
            if won.modified_count:
                return KeyClaim("taken_over", key, record["seed"], lease_until)
            return KeyClaim("in_use", key, lease_until=held_until)
        # Inserted and removed again under us each time: let the client come back.
        return KeyClaim("in_use", key, lease_until=lease_until)

    def _held(self, claim: KeyClaim) -> Document:
        # Only the holder of this lease finishes the record: one that outlived its lease
        # (clock skew between hosts) must not finish, or forget, its successor's.
        return {"_id": claim.key, "seed": claim.seed, "lease_until": claim.lease_until}

    @guarded
    def complete(self, claim: KeyClaim, status: int, body: Any) -> bool:
        """Store the answer for replays; False if the lease was no longer ours."""
        result = self.records.update_one(
            {**self._held(claim), "state": "running"},
            {"$set": {"state": "done", "status": status, "body": body}},
        )
        return result.modified_count == 1

    @guarded
    def forget(self, claim: KeyClaim) -> bool:
        """Remove the key (a 4xx wrote nothing), so a corrected retry runs afresh."""
        return self.records.delete_one({**self._held(claim), "state": "running"}).deleted_count == 1

    @guarded
    def release(self, claim: KeyClaim, now: datetime) -> bool:
        """End the lease now, so that the client's retry takes over at once."""
        result = self.records.update_one(
            {**self._held(claim), "state": "running"}, {"$set": {"lease_until": _millis(now)}}
        )
        return result.modified_count == 1


def deadline(seconds: float) -> contextlib.AbstractContextManager[Any]:
    """Bound every database call made inside the block, all together, by `seconds`.

    The client's timeoutMS bounds each call alone; a request that makes two calls could
    otherwise take twice DB_TIMEOUT_MS before its 503.
    """
    return pymongo.timeout(seconds)
