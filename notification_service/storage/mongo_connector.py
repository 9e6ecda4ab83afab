"""The MongoDB client, its deadlines, and database error handling.

Every call is bounded by the client-side operation timeout (DB_TIMEOUT_MS), and every
driver error that means "the database did not answer" becomes DatabaseUnavailable (which
the web layer answers with 503), so no request hangs and no background loop mistakes an
outage for a bug.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import pymongo
from pymongo import MongoClient, uri_parser
from pymongo.database import Database
from pymongo.errors import BulkWriteError, ConnectionFailure, PyMongoError, WriteConcernError

from ..config import Config, ConfigError

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")

Document = dict[str, Any]
_BAD_DATABASE_CHARS = frozenset('/\\. "$\0')
DUPLICATE_KEY = 11000
# The server refusing a write to one document (the application's users collection may
# hold anything): the document, not the database, is the trouble (a 409, not a 503).
BAD_VALUE = 2  # e.g. "$push: the field must be an array"
PATH_NOT_VIABLE = 28  # e.g. `$inc` or `$set` through a field that is not a document
TOO_LARGE = frozenset({10334, 17419, 17420})  # the document would pass 16 MB
INVALID = 121  # DocumentValidationFailure: the application's validator said no
DOCUMENT_REFUSALS = frozenset({BAD_VALUE, PATH_NOT_VIABLE, INVALID, *TOO_LARGE})


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
            session = kwargs.get("session")
            if (
                session is not None
                and getattr(session, "in_transaction", False)
                and not (isinstance(exc, ConnectionFailure) or exc.timeout)
            ):
                # Inside a transaction the server's own refusal goes to with_transaction,
                # whose labels tell it to run the transaction again (a write conflict);
                # a database that does not answer ends it at once, as a 503.
                raise
            if unavailable(exc):
                log.warning("database unavailable in %s: %s", func.__qualname__, exc)
                raise DatabaseUnavailable(str(exc)) from exc
            raise

    return wrapper


# What the server labels an error that a later attempt may not meet.
_TRANSIENT_LABELS = (
    "TransientTransactionError",
    "UnknownTransactionCommitResult",
    "RetryableWriteError",
)


def unavailable(exc: PyMongoError) -> bool:
    """Whether `exc` says the database did not answer, or could not confirm a write: a
    503 that a retry may get past, never a bug's 500.

    ConnectionFailure covers refused, reset, server selection and network timeouts;
    `timeout` the client-side operation timeout (CSOT). A write concern error means
    the write was applied but is not known to be durable (a commit whose answer was
    lost among them); the labels are the server's own "try again".
    """
    if isinstance(exc, ConnectionFailure | WriteConcernError) or exc.timeout:
        return True
    if isinstance(exc, BulkWriteError) and exc.details.get("writeConcernErrors"):
        return True
    return any(exc.has_error_label(label) for label in _TRANSIENT_LABELS)


def check_uri(config: Config) -> None:
    """Refuse a DB_URI the driver would refuse later, without connecting.

    :raise ConfigError: naming DB_URI.
    """
    uri = config.reveal_db_uri() or ""
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
        config.reveal_db_uri(),
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


def only_duplicates(exc: BulkWriteError) -> bool:
    """Whether a bulk write failed only on documents that exist already (and was durable)."""
    errors = exc.details.get("writeErrors", [])
    return (
        bool(errors)
        and all(error.get("code") == DUPLICATE_KEY for error in errors)
        and not exc.details.get("writeConcernErrors")
    )


def with_own_deadline(seconds: float, work: Callable[[], R]) -> R:
    """Run `work` with a database budget of its own, not what is left of the caller's.

    A `pymongo.timeout` inside another can only shorten it; this starts from a fresh
    context (so `work` must not need the caller's context variables: pass it what it
    uses).
    """

    def run() -> R:
        with pymongo.timeout(seconds):
            return work()

    return contextvars.Context().run(run)


def deadline(seconds: float) -> contextlib.AbstractContextManager[Any]:
    """Bound every database call made inside the block, all together, by `seconds`.

    The client's timeoutMS bounds each call alone; a request that makes two calls could
    otherwise take twice DB_TIMEOUT_MS before its 503.
    """
    return pymongo.timeout(seconds)
