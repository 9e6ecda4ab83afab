"""The price of "email if unread" (issue 17 item 4): `make bench`'s section 13, or alone.

Against an embedded SecantusDB (as `make run` starts it) and an in-process aiosmtpd
that only counts, on one dispatcher thread:

1. per create when nothing is due: the notification's push alone (a key that only
   records), open_digest + push (opening, then joining a batch), and an `always`
   key's outbox writes + push (the standalone path: insert pending, push, activate;
   and the replica set's: insert and push in one transaction);
2. per email at due time: draining N plain queued emails against N due digests of 3
   unread notifications each (claim, user read, render, content write, send, record).

Each figure is wall time per operation and the database commands it took.

    PYTHONPATH=. .venv/bin/python bench/digest_price.py [N]
"""

from __future__ import annotations

import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from bson import ObjectId
from pymongo import monitoring

from notification_service.config import Config
from notification_service.digests import Digests, open_digest
from notification_service.dispatcher import Dispatcher, RateLimiter
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.embedded import free_port, start_database
from notification_service.keys import DEFAULT_KEYS, KeySpec, KeyTable
from notification_service.outbox import Outbox
from notification_service.runtime import build_runtime
from notification_service.schemas import Notification
from notification_service.storage.digest_outbox import DigestOutbox
from notification_service.storage.digest_store import DigestStore
from notification_service.storage.ids import new_id


class Commands(monitoring.CommandListener):
    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.lock:
            self.counts[event.command_name] += 1

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        pass

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def take(self) -> int:
        with self.lock:
            n = sum(v for k, v in self.counts.items() if k not in ("hello", "isMaster", "ping"))
            self.counts.clear()
            return n


class Counting:
    def __init__(self) -> None:
        self.received = 0

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received += 1
        return "250 OK"


class Clock:
    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def wait(self, event: threading.Event, seconds: float) -> bool:
        return event.wait(seconds)


DIGESTED = KeySpec("new_message", in_app=True, email="if_unread", email_after_seconds=60)
KEYS = KeyTable([*(s for s in DEFAULT_KEYS if s.name != DIGESTED.name), DIGESTED])


def notification(user_id: str, key: str, now: datetime) -> Notification:
    nid = new_id()
    return {"id": nid, "timestamp": int(now.timestamp()), "is_new": True, "user_id": user_id,
            "key": key, "target_id": None, "data": {"n": nid}, "count": 1,
            "collapse_key": None}  # fmt: skip


# What `main` measured: (label, ms an operation, database commands an operation); read
# by bench/run.py's section 13.
MEASURED: list[tuple[str, float, float]] = []
_LISTENER: list[Commands] = []  # registered once per process: pymongo keeps every one


def per_op(label: str, n: int, seconds: float, commands: int) -> None:
    MEASURED.append((label, seconds / n * 1000, commands / n))
    print(f"{label:58s} {seconds / n * 1000:7.2f} ms  {commands / n:5.2f} commands")


def main(n: int) -> None:
    if not _LISTENER:
        _LISTENER.append(Commands())
        monitoring.register(_LISTENER[0])
    listener = _LISTENER[0]
    patched: list[tuple[Any, str, Any]] = []
    child, uri = start_database(None, Path(tempfile.mkdtemp()))
    handler = Counting()
    smtp = Controller(handler, hostname="127.0.0.1", port=free_port())
    smtp.start()
    try:
        config = Config(
            db_uri=uri, dispatcher_threads=0, keys=KEYS, smtp_host="127.0.0.1",
            smtp_port=smtp.port, smtp_security="none",
        )  # fmt: skip
        clock = Clock()
        rt = build_runtime(config, clock=clock)
        svc = rt.services
        users = svc.store.users
        ids = [str(ObjectId()) for _ in range(n)]
        users.insert_many([{"_id": ObjectId(u), "email": f"{u}@example.com", "notifications": []}
                           for u in ids])  # fmt: skip
        print(f"SecantusDB, {n} users; transactions: {svc.store.supports_transactions()}")
        listener.take()

        def timed(label: str, work: Any) -> None:
            listener.take()
            started = time.perf_counter()
            for user_id in ids:
                work(user_id, clock.now())
            per_op(label, n, time.perf_counter() - started, listener.take())

        def push(user_id: str, now: datetime, key: str = "new_post") -> str:
            note = notification(user_id, key, now)
            svc.store.append([(user_id, note)], now, require_email=False)
            return note["id"]

        def digest_create(user_id: str, now: datetime) -> None:
            note = notification(user_id, DIGESTED.name, now)
            open_digest(svc.outbox, DIGESTED, user_id, note["id"], now)
            svc.store.append([(user_id, note)], now, require_email=False)

        def always_create(user_id: str, now: datetime) -> None:
            note = notification(user_id, "new_login", now)
            [email_id] = svc.outbox.enqueue_many(
                [{"kind": "notification", "to": f"{user_id}@example.com", "subject": "s",
                  "text": "t", "html": None, "message_id": f"<{new_id()}@x>",
                  "user_id": user_id, "notification_id": note["id"], "key": "new_login"}],
                now, email_ids=[new_id()], pending=True,
            )  # fmt: skip
            svc.store.append([(user_id, note)], now, require_email=True)
            svc.outbox.activate([email_id], now)

        def always_in_transaction(user_id: str, now: datetime) -> None:
            note = notification(user_id, "new_login", now)

            def both(session: Any) -> None:
                svc.outbox.enqueue_many(
                    [{"kind": "notification", "to": f"{user_id}@example.com", "subject": "s",
                      "text": "t", "html": None, "message_id": f"<{new_id()}@x>",
                      "user_id": user_id, "notification_id": note["id"], "key": "new_login"}],
                    now, email_ids=[new_id()], session=session,
                )  # fmt: skip
                svc.store.append([(user_id, note)], now, require_email=True, session=session)

            svc.store.in_transaction(both)

        timed("create, push only (new_post)", push)
        timed("create, open_digest (opens) + push", digest_create)
        timed("create, open_digest (joins) + push", digest_create)
        timed("create, open_digest (joins) + push, again", digest_create)
        timed("create, always: insert pending + push + activate", always_create)
        timed("create, always: insert + push in a transaction", always_in_transaction)

        def dispatcher() -> Dispatcher:
            context = replace(
                rt.dispatch_context(),
                digests=Digests(
                    outbox=svc.outbox, users=DigestStore(svc.outbox.records.database, config),
                    templates=svc.templates, keys=KEYS, preferences=NoPrefs(),
                    unsubscribe_url=lambda u, k: None, sender_domain="example.com",
                ),
            )  # fmt: skip
            return Dispatcher(
                context=context, sender=SmtpSender(SmtpSettings.from_config(config)),
                name="price", limiter=RateLimiter(0), wake=threading.Event(),
                stopping=threading.Event(), rng=random.Random(1),
            )  # fmt: skip

        def drain(label: str, expected: int) -> None:
            d = dispatcher()
            before = handler.received
            listener.take()
            started = time.perf_counter()
            while d.dispatch_once():
                pass
            d.close()
            seconds = time.perf_counter() - started
            sent = handler.received - before
            assert sent == expected, (sent, expected)
            per_op(label, expected, seconds, listener.take())
            for name, total in sorted(spent.items()):
                print(f"    {name:20s} {total / expected * 1000:7.2f} ms per email")
            spent.clear()

        spent: dict[str, float] = defaultdict(float)

        def clocked(owner: Any, name: str) -> None:
            original = getattr(owner, name)
            patched.append((owner, name, original))

            def timed_call(*args: Any, **kwargs: Any) -> Any:
                started = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    spent[name] += time.perf_counter() - started

            setattr(owner, name, timed_call)

        for owner, name in [(DigestStore, "unread"), (DigestOutbox, "write_digests"),
                            (Digests, "prepare"), (Outbox, "claim_batch"),
                            (Outbox, "mark_sent"), (SmtpSender, "send")]:  # fmt: skip
            clocked(owner, name)

        # The `always` emails above are queued: send them first, as plain emails.
        drain(f"due time, plain email (x{2 * n}, batches of {config.dispatch_batch_size})", 2 * n)
        clock.offset += timedelta(seconds=DIGESTED.email_after_seconds + 1)
        drain(f"due time, digest of 3 unread (x{n})", n)
    finally:
        for owner, name, original in reversed(patched):  # as they were, for the next run
            setattr(owner, name, original)
        smtp.stop()
        child.stop()


class NoPrefs:
    def email_allowed(self, user_ids: list[str], key: str) -> set[str]:
        return set(user_ids)

    def opted_out(self, user_doc: dict[str, Any], key: str) -> set[str]:
        return set()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
