"""Section 6, email: the outbox dispatcher against plain smtplib to the same sink, and the
outbox's cost in database commands. Not email.py, which would shadow the stdlib's `email`."""

from __future__ import annotations

import dataclasses
import email.policy
import smtplib
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from figures import Figure
from pymongo import monitoring

from notification_service import dispatcher as d
from notification_service.config import Config
from notification_service.email_sender import OutgoingEmail, build_message
from notification_service.email_templates import EmailTemplates
from notification_service.notifications import message_id, utc_now
from notification_service.runtime import build_runtime
from notification_service.schemas import Notification
from notification_service.storage.ids import new_id

SECTION = "6. Email"


class Counts(monitoring.CommandListener, d.DispatchEvents):
    """The commands to one database and their seconds (clients created after registering),
    and the emails sent, from the pool's threads: `done` set once `left` were sent."""

    def __init__(self, database: str, left: int) -> None:
        self.database, self.commands, self.seconds, self.left = database, 0, 0.0, left
        self.failures, self.done, self.lock = 0, threading.Event(), threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        with self.lock:
            self.commands += event.database_name == self.database

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        with self.lock:
            self.seconds += (event.database_name == self.database) * event.duration_micros / 1e6

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        pass

    def send_finished(self, outcome: d.SendOutcome, seconds: float | None) -> None:
        with self.lock:
            self.failures += outcome != "sent"
            self.left -= outcome == "sent"
            if self.left == 0:
                self.done.set()


def records(count: int, config: Config) -> list[dict[str, Any]]:
    """new_login emails rendered by the service's templates, as notifications.py stores them."""
    templates, now, out = EmailTemplates(config.templates_dir, config.keys), int(time.time()), []
    for i in range(count):
        user = {"_id": f"{i:024x}", "email": f"user{i}@example.com", "name": f"User {i}"}
        data = {"ip": f"203.0.113.{i % 250}", "device": "Firefox 131 on Ubuntu 24.04"}
        note = Notification(id=new_id(), timestamp=now, is_new=True, user_id=user["_id"],
                            key="new_login", target_id=f"t{i}", data=data, count=1,
                            collapse_key=None)  # fmt: skip
        out.append({"kind": "notification", "to": user["email"], "message_id": message_id(config),
                    "user_id": user["_id"], "notification_id": note["id"], "key": note["key"],
                    **dataclasses.asdict(templates.render(note["key"], [note], user))})  # fmt: skip
    return out


def email_figures(
    db_uri: str, sink_port: int, rounds: int, quick: bool, progress: Callable[[str], None]
) -> list[Figure]:
    count, name = (150 if quick else 750), f"bench_email_{uuid.uuid4().hex[:8]}"
    counts = Counts(name, 0)
    monitoring.register(counts)  # before build_runtime creates the service's client
    # As `make run` runs its dispatchers: the defaults, and what serve sets for its sink.
    config = Config(db_uri=urlsplit(db_uri)._replace(path=f"/{name}").geturl(),
                    smtp_host="127.0.0.1", smtp_port=sink_port, smtp_security="none")  # fmt: skip
    # No dispatchers of its own: they would send, uncounted, what the measured pool claims.
    runtime = build_runtime(config, dispatcher_threads=0)
    svc, outbox, emails = runtime.services, runtime.services.outbox, records(count, config)
    # `make run`: each of its web workers runs its dispatcher threads, all on one outbox.
    batch, threads = config.dispatch_batch_size, config.web_workers * config.dispatcher_threads
    plain = Figure(SECTION, "plain smtplib, one connection", "emails/s",
                   note="each message built in the loop, as the dispatcher builds it")  # fmt: skip
    dispatcher = Figure(SECTION, f"dispatcher, {threads} threads ({config.web_workers} workers "
                        f"of {config.dispatcher_threads}, as make run)", "emails/s")  # fmt: skip
    ratio = Figure(SECTION, "dispatcher / smtplib", "ratio", "≥ 0.8", lambda v: v >= 0.8)
    per_email = Figure(SECTION, "database commands per email (dispatcher)", "commands")
    db_wait = Figure(SECTION, "time waiting on the database per email (dispatcher)", "ms")
    claim = Figure(SECTION, f"one claim of {batch} emails, measured alone", "ms")

    def send_plain() -> float:
        sender, sender_name = config.smtp_email, config.smtp_name
        with smtplib.SMTP("127.0.0.1", sink_port, local_hostname="localhost") as conn:
            start = time.perf_counter()
            for r in emails:
                mail = OutgoingEmail(r["to"], r["subject"], r["text"], r["html"], r["message_id"])
                message = build_message(mail, from_email=sender, from_name=sender_name)
                conn.sendmail(sender, [r["to"]], message.as_bytes(policy=email.policy.SMTP))
            return count / (time.perf_counter() - start)

    def dispatch() -> float:
        outbox.enqueue_many(emails, utc_now(), email_ids=[new_id() for _ in emails])
        counts.left, counts.failures, before = count, 0, (counts.commands, counts.seconds)
        counts.done.clear()
        start = time.perf_counter()
        context = d.DispatchContext(
            config, outbox, runtime.clock, svc.store.has_notification, counts
        )
        pool = d.DispatcherPool.start(context, threads)
        finished = counts.done.wait(60 + count / 5)
        pool.stop()  # returns once the last sends are recorded
        seconds = time.perf_counter() - start
        per_email.add(lambda: (counts.commands - before[0]) / count)
        db_wait.add(lambda: (counts.seconds - before[1]) * 1000 / count)
        stored = outbox.records.count_documents({"status": "sent"})
        outbox.records.delete_many({})
        if not finished or counts.failures or stored != count:
            raise RuntimeError(f"dispatcher: {stored} of {count} sent, {counts.failures} failed")
        return count / seconds

    def claims_alone() -> float:
        outbox.enqueue_many(emails, utc_now(), email_ids=[new_id() for _ in emails])
        now, claims, start = utc_now(), -(-count // batch), time.perf_counter()
        for n in range(claims):
            if not outbox.claim_batch(f"bench:{n}", now, config.dispatch_lease_seconds, batch):
                raise RuntimeError(f"claim {n + 1} of {claims} found nothing due")
        seconds = time.perf_counter() - start
        outbox.records.delete_many({})
        return seconds * 1000 / claims

    try:
        for n in range(rounds):
            # Alternated, so that neither always runs on the machine the other left.
            for figure, measure in [(plain, send_plain), (dispatcher, dispatch)][:: 1 - n % 2 * 2]:
                figure.add(measure)
            ratio.add(lambda: dispatcher.rounds[-1] / plain.rounds[-1])
            claim.add(claims_alone)
            progress(f"email round {n + 1}/{rounds}: smtplib {plain.rounds[-1]:.0f}/s, dispatcher "
                     f"{dispatcher.rounds[-1]:.0f}/s, {per_email.rounds[-1]:.2f} commands/email, "
                     f"{claim.rounds[-1]:.0f} ms/claim")  # fmt: skip
    finally:
        runtime.client.drop_database(name)
        runtime.close()
    claim.note = f"{claim.median / batch:.2f} ms per email"
    if ratio.verdict != "met":  # its threads wait for the database between sends
        ratio.note = (
            f"each of the {threads} threads takes {threads * 1000 / dispatcher.median:.1f} ms an "
            f"email, {db_wait.median:.1f} of it waiting on the database (claims alone: "
            f"{claim.median / batch:.1f}); smtplib takes {1000 / plain.median:.1f}"
        )
    return [plain, dispatcher, ratio, per_email, db_wait, claim]
