"""Dead letters: failed emails listed (GET /email?status=failed) and sent again, one
(POST /email/<id>/resend) or in bulk (POST /email/failed/resend), against a real SecantusDB, a
real dispatcher and a real SMTP server (aiosmtpd), time moved by the test's clock."""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from bson import ObjectId
from clocks import FakeClock
from conftest import runtime
from flask import Flask
from flask.testing import FlaskClient
from smtp_fixtures import SmtpServer

from notification_service.config import Config, Secret
from notification_service.dispatcher import DispatchContext, Dispatcher, RateLimiter
from notification_service.email_sender import SmtpSender, SmtpSettings
from notification_service.runtime import build_runtime
from notification_service.storage.dead_letter_store import HISTORY_MAX

FAST_RETRY = {"dispatch_backoff_base_seconds": 0.01, "dispatch_backoff_max_seconds": 0.05}
KEY = "k" * 32


@dataclass
class Mail:
    """An app and a dispatcher on the test's clock, and the SMTP server they send to."""

    app: Flask
    client: FlaskClient
    dispatcher: Dispatcher
    server: SmtpServer
    clock: FakeClock

    def queue(self, to: str = "someone@example.com", subject: str = "Hello") -> str:
        body = {"to": to, "subject": subject, "text": "Hi."}
        response = self.client.post("/email", json=body)
        assert response.status_code == 202, response.get_json()
        email_id: str = response.get_json()["data"]["email_id"]
        return email_id

    def drain(self, limit: int = 100) -> int:
        """Dispatch until nothing is due; return how many sends were attempted."""
        handled = 0
        while handled < limit and (n := self.dispatcher.dispatch_once()):
            handled += n
        return handled

    def fail(self, *email_ids: str) -> None:
        """Send what is due to a server that refuses everything (550): failed for good."""
        self.server.permanent_code = 550
        self.drain()
        for email_id in email_ids:
            assert self.state(email_id)["status"] == "failed"
        self.server.permanent_code = None

    def state(self, email_id: str) -> dict[str, Any]:
        response = self.client.get(f"/email/{email_id}")
        assert response.status_code == 200
        data: dict[str, Any] = response.get_json()["data"]
        return data

    def failed(self, **params: Any) -> Any:
        return self.client.get("/email", query_string={"status": "failed", **params})

    def resend_all(self, **body: Any) -> Any:
        return self.client.post("/email/failed/resend", json={"status": "failed", **body})


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def make_mail(
    make_app: Callable[..., Flask],
    make_config: Callable[..., Config],
    smtp_factory: Callable[..., SmtpServer],
    clock: FakeClock,
) -> Iterator[Callable[..., Mail]]:
    made: list[Dispatcher] = []

    def make(**overrides: Any) -> Mail:
        server = smtp_factory()
        config = make_config(**server.config_kwargs(), **{**FAST_RETRY, **overrides})
        app = make_app(config, runtime=build_runtime(config, clock=clock))
        services = runtime(app).services
        context = DispatchContext(
            config=services.config,
            outbox=services.outbox,
            clock=clock,
            is_recorded=services.store.has_notification,
        )
        dispatcher = Dispatcher(
            context=context,
            sender=SmtpSender(SmtpSettings.from_config(config)),
            name=f"test{len(made)}",
            limiter=RateLimiter(0),
            wake=threading.Event(),
            stopping=threading.Event(),
            rng=random.Random(7),
        )
        made.append(dispatcher)
        return Mail(app, app.test_client(), dispatcher, server, clock)

    yield make
    for dispatcher in made:
        dispatcher.close()


@pytest.fixture
def mail(make_mail: Callable[..., Mail]) -> Mail:
    return make_mail()


def _ids(answer: Any) -> list[str]:
    return [item["id"] for item in answer.get_json()["data"]["list"]]


# --- listing -------------------------------------------------------------------------


def test_failed_emails_are_listed_newest_failure_first_each_as_get_email_shows_it(
    mail: Mail,
) -> None:
    failed = []
    for n in range(4):
        failed.append(mail.queue(subject=f"number {n}"))
        mail.fail(failed[-1])
        mail.clock.advance(60)
    sent = mail.queue()
    mail.drain()
    assert mail.state(sent)["status"] == "sent"
    answer = mail.failed()
    assert answer.status_code == 200
    body = answer.get_json()
    assert body["success"] is True
    assert body["data"]["matched"] == 4
    assert _ids(answer) == failed[::-1]
    for item in body["data"]["list"]:
        assert item == mail.state(item["id"])
        assert item["status"] == "failed"
        assert item["to"] == "someone@example.com"
        assert item["attempts"] == 1
        assert item["last_error"]["code"] == 550
        assert item["failed_at"] is not None
        assert item["history"] == [] and item["requeued_at"] is None


def test_paging_keeps_the_order_and_ties_in_failure_time_go_by_id(mail: Mail) -> None:
    first = [mail.queue() for _ in range(3)]
    mail.fail(*first)  # one batch: the same failed_at
    mail.clock.advance(5)
    last = mail.queue()
    mail.fail(last)
    expected = [last, *sorted(first, reverse=True)]
    assert _ids(mail.failed(limit=2)) == expected[:2]
    assert _ids(mail.failed(skip=2, limit=2)) == expected[2:]
    assert _ids(mail.failed(skip=4)) == []
    assert mail.failed(skip=4).get_json()["data"]["matched"] == 4
    assert _ids(mail.failed(limit=0)) == []


def test_the_key_filter_lists_only_that_key_s_failed_emails(
    mail: Mail, make_user: Callable[..., str]
) -> None:
    user = make_user()
    assert mail.client.post("/create", json={"user_id": user, "key": "registration"}).status_code
    custom = mail.queue()
    mail.server.permanent_code = 550
    assert mail.drain() == 2
    registration = mail.failed(key="registration").get_json()["data"]
    assert registration["matched"] == 1
    assert registration["list"][0]["key"] == "registration"
    assert mail.failed(key="new_login").get_json()["data"] == {"list": [], "matched": 0}
    assert mail.failed().get_json()["data"]["matched"] == 2
    assert custom in _ids(mail.failed())


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 101},
        {"limit": -1},
        {"skip": -1},
        {"status": "sent"},
        {"status": ""},
        {"key": "Not A Key"},
        {"key": {"$ne": None}},
        {"unknown": "1"},
    ],
)
def test_a_bad_listing_query_is_a_422_in_the_one_error_shape(mail: Mail, params: Any) -> None:
    answer = mail.failed(**params)
    assert answer.status_code == 422
    body = answer.get_json()
    assert body["success"] is False
    assert body["error"]["code"] == "validation_failed"


def test_a_listing_without_a_status_is_refused(mail: Mail) -> None:
    assert mail.client.get("/email").status_code == 422


def test_the_limit_follows_list_max_limit(make_mail: Callable[..., Mail]) -> None:
    mail = make_mail(list_max_limit=3)
    assert mail.failed(limit=3).status_code == 200
    assert mail.failed(limit=4).status_code == 422


# --- resend one ----------------------------------------------------------------------


def test_a_resend_restarts_the_attempts_keeps_the_history_and_the_email_is_sent(
    mail: Mail, db: Any
) -> None:
    email_id = mail.queue()
    mail.fail(email_id)
    before = mail.state(email_id)
    mail.clock.advance(30)
    answer = mail.client.post(f"/email/{email_id}/resend")
    assert answer.status_code == 202
    state = answer.get_json()["data"]
    assert state["status"] == "queued"
    assert state["attempts"] == 0
    assert state["last_error"] is None and state["failed_at"] is None
    assert state["requeued_at"] == state["next_attempt_at"]
    assert state["history"] == [
        {"attempts": 1, "last_error": before["last_error"], "failed_at": before["failed_at"]}
    ]
    # No longer failed: not listed, and out of the failed retention index's reach
    # (partial on the status) until it fails again.
    assert mail.failed().get_json()["data"]["matched"] == 0
    record = db.email_outbox.find_one({"_id": ObjectId(email_id)})
    assert record["status"] == "queued" and record["failed_at"] is None
    assert mail.drain() == 1
    [received] = mail.server.wait_for_messages(1)
    assert received.message["Subject"] == "Hello"
    after = mail.state(email_id)
    assert (after["status"], after["attempts"]) == ("sent", 1)
    assert after["history"] == state["history"]


def test_the_history_keeps_the_latest_lives_up_to_its_cap(mail: Mail) -> None:
    email_id = mail.queue()
    mail.fail(email_id)
    for _ in range(HISTORY_MAX + 2):
        mail.clock.advance(1)
        assert mail.client.post(f"/email/{email_id}/resend").status_code == 202
        mail.fail(email_id)
    state = mail.state(email_id)
    assert len(state["history"]) == HISTORY_MAX
    times = [earlier["failed_at"] for earlier in state["history"]]
    assert times == sorted(times)  # oldest first; the two oldest lives dropped
    assert state["failed_at"] > times[-1]


def test_of_concurrent_resends_exactly_one_is_accepted_and_the_email_goes_once(
    mail: Mail,
) -> None:
    email_id = mail.queue()
    mail.fail(email_id)
    threads = 8
    start = threading.Barrier(threads)
    answers: list[tuple[int, str | None]] = []
    lock = threading.Lock()

    def resend() -> None:
        client = mail.app.test_client()
        start.wait()
        response = client.post(f"/email/{email_id}/resend")
        body = response.get_json()
        with lock:
            answers.append((response.status_code, body.get("error", {}).get("code")))

    workers = [threading.Thread(target=resend) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    assert Counter(answers) == {(202, None): 1, (409, "email_not_failed"): threads - 1}
    assert mail.drain() == 1
    mail.server.wait_for_messages(1)
    assert mail.drain() == 0
    assert len(mail.server.messages) == 1
    assert len(mail.state(email_id)["history"]) == 1


def test_an_email_that_has_not_failed_is_a_409_and_an_unknown_one_a_404(mail: Mail) -> None:
    queued = mail.queue()
    answer = mail.client.post(f"/email/{queued}/resend")
    assert answer.status_code == 409
    assert answer.get_json()["error"]["code"] == "email_not_failed"
    mail.drain()
    assert mail.state(queued)["status"] == "sent"
    assert mail.client.post(f"/email/{queued}/resend").status_code == 409
    missing = mail.client.post(f"/email/{ObjectId()}/resend")
    assert missing.status_code == 404
    assert missing.get_json()["error"]["code"] == "email_not_found"
    assert len(mail.server.messages) == 1


@pytest.mark.parametrize(
    "email_id",
    [
        "nope",
        "6756b2f1a4c3e0d9b8f7123g",
        "6756b2f1a4c3e0d9b8f71234a",
        "%24ne",
        "6756b2f1a4c3e0d9b8f7123%0A",
        "6756b2f1a4c3e0d9b8f7123%00",
        "%F0%9F%92%A5" * 8,
        "x" * 5000,
        "..%2F..%2Fetc",
    ],
)
def test_a_hostile_id_is_refused_in_the_one_error_shape_never_a_500(
    mail: Mail, email_id: str
) -> None:
    answer = mail.client.post(f"/email/{email_id}/resend")
    assert answer.status_code in (404, 422), answer.data[:200]
    body = answer.get_json()
    assert body["success"] is False
    assert body["error"]["code"] in ("validation_failed", "not_found", "email_not_found")


# --- bulk resend ---------------------------------------------------------------------


def _fail_at(mail: Mail, seconds: float, *, user: str | None = None) -> str:
    """An email (of `registration` when for `user`) failed `seconds` after now."""
    mail.clock.advance(seconds)
    if user is None:
        email_id = mail.queue()
    else:
        created = mail.client.post("/create", json={"user_id": user, "key": "registration"})
        email_id = created.get_json()["data"]["email_id"]
    mail.fail(email_id)
    return email_id


def test_a_bulk_resend_by_key_requeues_only_that_key_s_and_a_second_finds_none(
    mail: Mail, make_user: Callable[..., str]
) -> None:
    keyed = [_fail_at(mail, 1, user=make_user()) for _ in range(3)]
    custom = _fail_at(mail, 1)
    answer = mail.resend_all(key="registration")
    assert answer.status_code == 200
    assert answer.get_json() == {"success": True, "data": {"requeued": 3}}
    assert _ids(mail.failed()) == [custom]
    for email_id in keyed:
        state = mail.state(email_id)
        assert (state["status"], state["attempts"], len(state["history"])) == ("queued", 0, 1)
    again = mail.resend_all(key="registration")
    assert again.get_json()["data"] == {"requeued": 0}
    assert mail.drain() == 3
    assert len(mail.server.wait_for_messages(3)) == 3
    assert len(mail.server.messages) == 3


def test_a_bulk_resend_before_a_time_leaves_the_later_failures_and_then_the_rest(
    mail: Mail,
) -> None:
    early = [_fail_at(mail, 10) for _ in range(2)]
    cut = mail.clock.now() + timedelta(seconds=5)
    late = [_fail_at(mail, 10) for _ in range(2)]
    before = cut.isoformat().replace("+00:00", "Z")
    answer = mail.resend_all(failed_before=before)
    assert answer.get_json()["data"] == {"requeued": 2}
    assert sorted(_ids(mail.failed())) == sorted(late)
    assert all(mail.state(e)["status"] == "queued" for e in early)
    # One of the requeued fails again: the next bulk resend (of all) takes it too.
    mail.server.permanent_code = 550
    assert mail.drain() == 2
    mail.server.permanent_code = None
    everything = mail.resend_all()
    assert everything.get_json()["data"] == {"requeued": 4}
    assert mail.drain() == 4
    assert len(mail.server.wait_for_messages(4)) == 4
    assert all(len(mail.state(e)["history"]) == 2 for e in early)
    assert all(len(mail.state(e)["history"]) == 1 for e in late)


def test_a_bulk_resend_and_single_resends_racing_requeue_each_email_once(mail: Mail) -> None:
    failed = [_fail_at(mail, 1) for _ in range(6)]
    start = threading.Barrier(1 + len(failed))
    singles: list[int] = []
    bulk: list[int] = []

    def one(email_id: str) -> None:
        client = mail.app.test_client()
        start.wait()
        singles.append(client.post(f"/email/{email_id}/resend").status_code)

    def everything() -> None:
        client = mail.app.test_client()
        start.wait()
        answer = client.post("/email/failed/resend", json={"status": "failed"})
        bulk.append(answer.get_json()["data"]["requeued"])

    workers = [threading.Thread(target=one, args=(e,)) for e in failed]
    workers.append(threading.Thread(target=everything))
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    # Each email requeued exactly once: by its own resend or by the bulk one.
    assert singles.count(202) + bulk[0] == len(failed)
    assert all(len(mail.state(e)["history"]) == 1 for e in failed)
    assert mail.drain() == len(failed)
    assert len(mail.server.wait_for_messages(len(failed))) == len(failed)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"status": "sent"},
        {"status": {"$ne": None}},
        {"status": "failed", "failed_before": "2026-12-01T00:00:00"},  # no offset
        {"status": "failed", "failed_before": 1700000000},
        {"status": "failed", "failed_before": "yesterday"},
        {"status": "failed", "key": "Bad Key"},
        {"status": "failed", "extra": 1},
    ],
)
def test_a_bad_bulk_resend_is_a_422_and_requeues_nothing(mail: Mail, body: Any) -> None:
    email_id = mail.queue()
    mail.fail(email_id)
    answer = mail.client.post("/email/failed/resend", json=body)
    assert answer.status_code == 422
    assert answer.get_json()["error"]["code"] == "validation_failed"
    assert mail.state(email_id)["status"] == "failed"


# --- the give-up age -----------------------------------------------------------------


def test_the_give_up_age_restarts_with_a_resend(make_mail: Callable[..., Mail]) -> None:
    mail = make_mail(dispatch_max_age_seconds=60)
    email_id = mail.queue()
    mail.fail(email_id)
    mail.clock.advance(3600)  # long past the give-up age counted from its creation
    assert mail.client.post(f"/email/{email_id}/resend").status_code == 202
    mail.server.fail_remaining, mail.server.fail_code = 1, 451
    assert mail.drain() == 1
    state = mail.state(email_id)
    # A transient failure retries: the age counts from the resend, not from the creation.
    assert (state["status"], state["attempts"]) == ("queued", 1)
    mail.clock.advance(1)
    assert mail.drain() == 1
    assert mail.state(email_id)["status"] == "sent"
    # And it still gives up, DISPATCH_MAX_AGE_SECONDS after the resend.
    other = mail.queue()
    mail.fail(other)
    assert mail.client.post(f"/email/{other}/resend").status_code == 202
    mail.server.fail_remaining = 1
    mail.clock.advance(61)
    assert mail.drain() == 1
    assert mail.state(other)["status"] == "failed"


# --- the operator's view --------------------------------------------------------------


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in the scrape")


def test_metrics_show_the_failed_emails_and_count_the_resends(mail: Mail) -> None:
    def scrape() -> str:
        return mail.client.get("/metrics").get_data(as_text=True)

    first = scrape()
    resent_one = _metric(first, 'notification_service_emails_resent_total{how="one"}')
    resent_bulk = _metric(first, 'notification_service_emails_resent_total{how="bulk"}')
    assert _metric(first, "notification_service_outbox_failed_emails") == 0
    failed = [_fail_at(mail, 1) for _ in range(3)]
    assert _metric(scrape(), "notification_service_outbox_failed_emails") == 3
    mail.client.post(f"/email/{failed[0]}/resend")
    mail.resend_all()
    after = scrape()
    assert _metric(after, "notification_service_outbox_failed_emails") == 0
    assert _metric(after, 'notification_service_emails_resent_total{how="one"}') == resent_one + 1
    assert _metric(after, 'notification_service_emails_resent_total{how="bulk"}') == (
        resent_bulk + 2
    )


def test_the_routes_need_an_api_key_and_refuse_a_user_token(
    make_app: Callable[..., Flask], make_config: Callable[..., Config]
) -> None:
    client = make_app(make_config(api_keys=(KEY,), user_token_key=Secret("s" * 40))).test_client()
    email_id = str(ObjectId())
    calls = [
        ("GET", "/email?status=failed", None),
        ("POST", f"/email/{email_id}/resend", None),
        ("POST", "/email/failed/resend", {"status": "failed"}),
    ]
    token = client.post(
        "/token", json={"user_id": str(ObjectId())}, headers={"Authorization": f"Bearer {KEY}"}
    ).get_json()["data"]["token"]
    for method, path, body in calls:
        assert client.open(path, method=method, json=body).status_code == 401
        with_token = client.open(
            path, method=method, json=body, headers={"Authorization": f"Bearer {token}"}
        )
        assert with_token.status_code in (401, 403)
        with_key = client.open(
            path, method=method, json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert with_key.status_code in (200, 404)


# --- the index -----------------------------------------------------------------------


def _stages(plan: dict[str, Any]) -> list[str]:
    stages = []
    while plan:
        stages.append(plan["stage"])
        plan = plan.get("inputStage", {})
    return stages


def test_the_dead_letter_queries_read_an_index_not_the_collection(
    mail: Mail, db: Any, clock: FakeClock
) -> None:
    mail.queue()  # the app's outbox makes its indexes
    records = db.email_outbox
    assert "dead_letters" in records.index_information()
    now: datetime = clock.now()
    order = [("failed_at", -1), ("_id", -1)]
    queries = [
        {"status": "failed"},
        {"status": "failed", "failed_at": {"$lt": now}},
    ]
    for query in queries:
        plan = records.find(query).sort(order).limit(10).explain()["queryPlanner"]
        assert "COLLSCAN" not in _stages(plan["winningPlan"]), plan


def test_an_smtp_reply_that_quotes_the_address_is_logged_without_it(
    mail: Mail, caplog: pytest.LogCaptureFixture
) -> None:
    # Servers name the recipient they refuse ("550 5.1.1 <bob@...>: Recipient address
    # rejected"). The record keeps the reply (last_error: an operator's dead letter,
    # erased with the user's data); the log, which no erasure reaches, must not.
    address = "Bob.Quoted+tag@mail.example.com"

    def refuse(stage: str) -> str | None:
        if stage != "RCPT":
            return None
        return f"{mail.server.permanent_code or 451} 5.1.1 <{address}>: Recipient address rejected"

    mail.server._scripted_reply = refuse  # type: ignore[method-assign]
    caplog.set_level("INFO")
    retried = mail.queue(to=address)
    mail.drain(limit=1)  # 451: retried later
    mail.server.permanent_code = 550
    mail.clock.advance(3600)
    mail.drain()
    assert address in mail.state(retried)["last_error"]["message"]
    assert mail.state(retried)["status"] == "failed"
    # The service's own lines (the test's SMTP server, aiosmtpd, logs what it receives).
    ours = [r for r in caplog.records if r.name.startswith("notification_service")]
    lines = [record.getMessage() for record in ours]
    assert any("retry in" in line for line in lines)
    assert any("failed for good" in line for line in lines)
    assert not [line for line in lines if address.lower() in line.lower()]
