"""The inbox API against a model of it: random sequences of creates, fan-outs, reads,
read-alls, deletes and the clock running past the retention, checked step by step.

A hypothesis state machine drives the service through its WSGI stack (Flask's test
client), on a database of its own per example, with the service's clock the one thing
faked. The model holds, per user, the live notifications newest first as
(id, is_new, timestamp); what has gone (deleted, pushed out by the cap, expired) is
kept apart, so that reads and deletes of gone ids are tried too.

Every write's answer carries the model's counts (and `changed` / `deleted`). After
every step, for each user the step may have changed (every user when the clock
moved; the others are as last checked): `/list` shows exactly the model (ids, flags,
timestamps, order, `elements`, `new`, `matched`), the cap holds, and `/count`, asked
with the last ETag it gave, answers 304 exactly while (elements, new) are unchanged,
else the model's numbers under a new tag.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

import pytest
from bson import ObjectId
from conftest import MongoServer
from flask.testing import FlaskClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from pymongo import MongoClient
from werkzeug.test import TestResponse

from notification_service.config import Config
from notification_service.server import create_app, runtime_of

USERS = 3
CAP = 4
TTL_DAYS = 1
TTL_SECONDS = TTL_DAYS * 86400
MISSING = "0123456789abcdef01234567"  # never an id the service makes
RECORDING = ("new_message", "new_post", "new_login")
KEYS = (*RECORDING, "registration")  # registration only emails: the inbox stays as it is
START = datetime(2026, 11, 28, 12, tzinfo=UTC)

# Examples (each a fresh database and app, then up to MODEL_STEPS steps): `make test` runs
# the quick count (3-8 s on a 2-core machine, depending on its load), `make faults` (and
# so CI) the long one. Set MODEL_EXAMPLES / MODEL_STEPS to explore further with the quick
# test (300 x 50 passed in about 10 minutes).
QUICK_EXAMPLES = int(os.environ.get("MODEL_EXAMPLES", "10"))
LONG_EXAMPLES = 100
STEPS = int(os.environ.get("MODEL_STEPS", "30"))


def model_settings(examples: int) -> settings:
    return settings(
        max_examples=examples,
        stateful_step_count=STEPS,
        deadline=None,
        # No example database: a failure is reported with its steps (and a reproduce blob).
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow],
    )


users = st.integers(min_value=0, max_value=USERS - 1)
# Which id a step aims at: one in the inbox, one that was there (deleted, capped away,
# expired), or one that never was. `pick` chooses among them (shrinks to the newest).
targets = st.sampled_from(("live", "gone", "unknown"))
picks = st.integers(min_value=0, max_value=2 * CAP)


@dataclass
class Entry:
    id: str
    is_new: bool
    timestamp: int


class Clock:
    """The service's clock, moved only by the machine's steps."""

    def __init__(self) -> None:
        self.now = START

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> int:
        return int(self.now.timestamp())


class InboxMachine(RuleBasedStateMachine):
    # The session's database server and a client of it, bound by the test (a subclass
    # per run). In a tuple: hypothesis looks for rules in every class attribute, and a
    # MongoClient answers any attribute name with a database.
    server: ClassVar[tuple[MongoServer, MongoClient[dict[str, Any]]]]

    def __init__(self) -> None:
        super().__init__()
        mongo_server, mongo_admin = self.server
        self.admin = mongo_admin
        self.db_name = f"t_{uuid.uuid4().hex[:12]}"
        config = Config(
            db_uri=mongo_server.uri(self.db_name),
            dispatcher_threads=0,
            db_timeout_ms=3000,
            notifications_limit=CAP,
            notifications_ttl_days=TTL_DAYS,
        )
        self.app = create_app(config)
        self.app.config["TESTING"] = False  # errors go through the real handlers
        self.clock = Clock()
        runtime = runtime_of(self.app)
        runtime.services = replace(runtime.services, clock=self.clock)
        self.client: FlaskClient = self.app.test_client()
        self.users = [str(ObjectId()) for _ in range(USERS)]
        mongo_admin[self.db_name][config.users_collection].insert_many(
            [
                {"_id": ObjectId(u), "email": f"user{i}@example.com"}
                for i, u in enumerate(self.users)
            ]
        )
        self.inbox: dict[str, list[Entry]] = {u: [] for u in self.users}
        self.gone: dict[str, list[str]] = {u: [] for u in self.users}
        # The last ETag of /count per user, and the counts it stood for.
        self.tags: dict[str, tuple[str, tuple[int, int]] | None] = dict.fromkeys(self.users)
        # The users a step may have changed (all of them when the clock moved): checked
        # after it. The others' expected state is what was checked last.
        self.dirty = set(self.users)

    def teardown(self) -> None:
        runtime_of(self.app).close()
        self.admin.drop_database(self.db_name)

    # -- the model -------------------------------------------------------------------

    def counts(self, user: str) -> tuple[int, int]:
        entries = self.inbox[user]
        return len(entries), sum(e.is_new for e in entries)

    def record(self, user: str, notification_id: str) -> None:
        self.dirty.add(user)
        entries = [Entry(notification_id, True, self.clock.seconds()), *self.inbox[user]]
        self.inbox[user] = entries[:CAP]
        self.gone[user] += [e.id for e in entries[CAP:]]

    def expire(self) -> None:
        """What is stamped at or before now - TTL is neither listed nor counted. Each
        user with notifications is checked after the clock moved (an empty inbox has
        nothing to expire)."""
        cutoff = self.clock.seconds() - TTL_SECONDS
        for user, entries in self.inbox.items():
            if entries:
                self.dirty.add(user)
            self.inbox[user] = [e for e in entries if e.timestamp > cutoff]
            self.gone[user] += [e.id for e in entries if e.timestamp <= cutoff]

    def target(self, user: str, which: str, pick: int) -> tuple[str, int | None]:
        """An id to aim at and its position in the inbox (None: not there). An empty
        choice falls back to the next one: live -> gone -> unknown."""
        self.dirty.add(user)
        entries, gone = self.inbox[user], self.gone[user]
        if which == "live" and entries:
            position = pick % len(entries)
            return entries[position].id, position
        if which in ("live", "gone") and gone:
            return gone[-1 - pick % len(gone)], None
        return MISSING, None

    # -- HTTP --------------------------------------------------------------------------

    def post(self, path: str, fields: dict[str, Any], as_json: bool) -> TestResponse:
        """The write routes take their fields as a query string or as a JSON body."""
        if as_json:
            return self.client.post(path, json=fields)
        query = {k: str(v).lower() if isinstance(v, bool) else v for k, v in fields.items()}
        return self.client.post(path, query_string=query)

    def expect(self, response: TestResponse, status: int) -> dict[str, Any]:
        assert response.status_code == status, (status, response.get_json())
        body: dict[str, Any] = response.get_json()
        if status >= 400:
            assert body["success"] is False
        return body

    def answers_counts(self, data: dict[str, Any], user: str) -> None:
        assert (data["elements"], data["new"]) == self.counts(user), data

    # -- steps -------------------------------------------------------------------------

    @initialize(
        sizes=st.lists(st.integers(min_value=0, max_value=CAP + 1), min_size=USERS, max_size=USERS)
    )
    def seed(self, sizes: list[int]) -> None:
        """Inboxes to start from (up to one past the cap), by fan-outs an hour apart:
        round r goes to the users that are to hold more than r."""
        for r in range(max(sizes)):
            if r:
                self.clock.now += timedelta(hours=1)
            chosen = [i for i, size in enumerate(sizes) if size > r]
            self.fan_out(chosen, "new_post")

    @rule(user=users, key=st.sampled_from(KEYS), times=st.integers(min_value=1, max_value=4))
    def create(self, user: int, key: str, times: int) -> None:
        """One notification, or a few in a row (so that the cap is reached often)."""
        u = self.users[user]
        self.dirty.add(u)
        for _ in range(times):
            response = self.client.post("/create", json={"user_id": u, "key": key})
            data = self.expect(response, 201)["data"]
            assert (data["email_id"] is not None) == (key in ("new_login", "registration"))
            if key == "registration":
                assert data["notification_id"] is None
                assert (data["elements"], data["new"]) == (None, None)
                continue
            self.record(u, data["notification_id"])
            self.answers_counts(data, u)

    @rule(
        members=st.lists(users, min_size=1, max_size=USERS, unique=True),
        key=st.sampled_from(RECORDING),
    )
    def fan_out(self, members: list[int], key: str) -> None:
        chosen = [self.users[i] for i in members]
        response = self.client.post("/create", json={"user_ids": chosen, "key": key})
        data = self.expect(response, 201)["data"]
        assert data["totals"] == {
            "created": len(chosen),
            "skipped": 0,
            "user_not_found": 0,
            "user_has_no_email": 0,
            "user_document_invalid": 0,
        }
        assert [r["user_id"] for r in data["results"]] == chosen
        assert len({r["notification_id"] for r in data["results"]}) == len(chosen)
        for result in data["results"]:
            assert result["status"] == "created"
            assert (result["email_id"] is not None) == (key == "new_login")
            self.record(result["user_id"], result["notification_id"])

    @rule(user=users, which=targets, pick=picks, as_json=st.booleans())
    def read(self, user: int, which: str, pick: int, as_json: bool) -> None:
        u = self.users[user]
        notification_id, position = self.target(u, which, pick)
        response = self.post("/read", {"user_id": u, "notification_id": notification_id}, as_json)
        if position is None:
            body = self.expect(response, 404)
            assert body["error"]["code"] == "notification_not_found"
            return
        self.inbox[u][position].is_new = False
        self.answers_counts(self.expect(response, 200)["data"], u)

    @rule(user=users, which=st.none() | targets, pick=picks, as_json=st.booleans())
    def read_all(self, user: int, which: str | None, pick: int, as_json: bool) -> None:
        """Without a watermark (which=None) all; with one, it and the older ones."""
        u = self.users[user]
        self.dirty.add(u)
        fields: dict[str, Any] = {"user_id": u}
        start: int | None = 0
        if which is not None:
            fields["up_to"], start = self.target(u, which, pick)
        response = self.post("/read-all", fields, as_json)
        if start is None:
            body = self.expect(response, 404)
            assert body["error"]["code"] == "notification_not_found"
            return
        marked = self.inbox[u][start:]
        changed = sum(e.is_new for e in marked)
        for entry in marked:
            entry.is_new = False
        data = self.expect(response, 200)["data"]
        assert data["changed"] == changed, (data, changed)
        self.answers_counts(data, u)

    @rule(user=users, which=targets, pick=picks, as_json=st.booleans())
    def delete(self, user: int, which: str, pick: int, as_json: bool) -> None:
        u = self.users[user]
        notification_id, position = self.target(u, which, pick)
        response = self.post("/delete", {"user_id": u, "notification_id": notification_id}, as_json)
        data = self.expect(response, 200)["data"]
        if position is not None:
            del self.inbox[u][position]
            self.gone[u].append(notification_id)
        assert data["deleted"] == (position is not None), data
        self.answers_counts(data, u)

    @rule(user=users, only_read=st.none() | st.booleans(), as_json=st.booleans())
    def delete_all(self, user: int, only_read: bool | None, as_json: bool) -> None:
        u = self.users[user]
        self.dirty.add(u)
        fields: dict[str, Any] = {"user_id": u}
        if only_read is not None:
            fields["read"] = only_read
        data = self.expect(self.post("/delete-all", fields, as_json), 200)["data"]
        entries = self.inbox[u]
        kept = [e for e in entries if e.is_new] if only_read else []
        self.inbox[u] = kept
        self.gone[u] += [e.id for e in entries if e not in kept]
        assert data["deleted"] == len(entries) - len(kept), data
        self.answers_counts(data, u)

    @rule(seconds=st.integers(min_value=1, max_value=25 * 3600))
    def later(self, seconds: int) -> None:
        """Seconds to more than a day: none, some or all of the inbox expires."""
        self.clock.now += timedelta(seconds=seconds)
        self.expire()

    @rule(user=users, past=st.booleans())
    def to_the_edge(self, user: int, past: bool) -> None:
        """The clock to the second the user's oldest notification expires (`past`), or
        the one before: retention's boundary exactly."""
        entries = self.inbox[self.users[user]]
        if not entries:
            return
        moment = entries[-1].timestamp + TTL_SECONDS - (0 if past else 1)
        if moment > self.clock.seconds():
            self.clock.now = datetime.fromtimestamp(moment, UTC)
            self.expire()

    # -- what must hold after every step -----------------------------------------------

    @invariant()
    def the_service_shows_the_model(self) -> None:
        for u in [u for u in self.users if u in self.dirty]:
            expected = self.counts(u)
            response = self.client.get(f"/list?user_id={u}&limit=100")
            page = self.expect(response, 200)["data"]
            shown = [(n["id"], n["is_new"], n["timestamp"]) for n in page["list"]]
            assert shown == [(e.id, e.is_new, e.timestamp) for e in self.inbox[u]]
            assert (page["elements"], page["new"]) == expected
            assert page["matched"] == page["elements"]
            assert len(page["list"]) <= CAP
            assert all(n["user_id"] == u for n in page["list"])
            self.check_count(u, expected)
        self.dirty.clear()

    def check_count(self, u: str, expected: tuple[int, int]) -> None:
        """/count's numbers, and its ETag: the same exactly while they are the same. Asked
        with the last tag: 304 while the counts are those it stood for, else 200 with
        the counts and a new tag."""
        last = self.tags[u]
        headers = {} if last is None else {"If-None-Match": last[0]}
        response = self.client.get(f"/count?user_id={u}", headers=headers)
        tag = response.headers["ETag"]
        if last is not None and last[1] == expected:
            assert response.status_code == 304, (last, response.get_json(), expected)
            assert response.data == b""
            assert tag == last[0]
            return
        data = self.expect(response, 200)["data"]
        assert (data["elements"], data["new"]) == expected
        assert last is None or tag != last[0], (last, tag, expected)
        self.tags[u] = (tag, expected)


def run_model(
    mongo_server: MongoServer, mongo_admin: MongoClient[dict[str, Any]], examples: int
) -> None:
    class Machine(InboxMachine):
        pass

    Machine.server = (mongo_server, mongo_admin)
    run_state_machine_as_test(Machine, settings=model_settings(examples))


def test_the_inbox_behaves_as_its_model(
    mongo_server: MongoServer, mongo_admin: MongoClient[dict[str, Any]]
) -> None:
    run_model(mongo_server, mongo_admin, QUICK_EXAMPLES)


@pytest.mark.faults
def test_the_inbox_behaves_as_its_model_at_length(
    mongo_server: MongoServer, mongo_admin: MongoClient[dict[str, Any]]
) -> None:
    run_model(mongo_server, mongo_admin, LONG_EXAMPLES)
