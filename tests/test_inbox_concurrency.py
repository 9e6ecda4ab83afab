"""Races through a real threaded HTTP server (werkzeug), with `requests` from many
threads: read-all with a watermark against creates, fan-outs against single creates
under a small cap, and one Idempotency-Key sent twenty times at once.

Nothing here is faked: the service runs on its real clock against the test's database.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import requests
from bson import ObjectId
from werkzeug.serving import make_server

from notification_service.config import Config
from notification_service.embedded import free_port
from notification_service.server import create_app, runtime_of

TIMEOUT = 30  # seconds, for any one HTTP call


@pytest.fixture
def serve(caplog: pytest.LogCaptureFixture) -> Iterator[Callable[[Config], str]]:
    """Start the app in a threaded HTTP server; returns its base URL."""
    caplog.set_level(logging.WARNING, logger="werkzeug")  # not a line per request
    stops: list[Callable[[], None]] = []

    def start(config: Config) -> str:
        app = create_app(config)
        server = make_server("127.0.0.1", free_port(), app, threaded=True)
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(10)
            runtime_of(app).close()

        stops.append(stop)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for stop in stops:
        stop()


def run_together(*targets: Callable[[], None], timeout: float = 120) -> None:
    """Run each target in its own thread; re-raise the first failure of any of them."""
    errors: list[BaseException] = []

    def guarded(target: Callable[[], None]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(t,), daemon=True) for t in targets]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread did not finish"
    if errors:
        raise errors[0]


def created_id(response: requests.Response) -> str:
    assert response.status_code == 201, (response.status_code, response.text)
    notification_id: str = response.json()["data"]["notification_id"]
    return notification_id


def inbox(session: requests.Session, base: str, user_id: str) -> dict[str, Any]:
    response = session.get(
        f"{base}/list", params={"user_id": user_id, "limit": "100"}, timeout=TIMEOUT
    )
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()["data"]
    return data


def counts(session: requests.Session, base: str, user_id: str) -> tuple[int, int]:
    response = session.get(f"{base}/count", params={"user_id": user_id}, timeout=TIMEOUT)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    return data["elements"], data["new"]


# --- read-all with a watermark, racing creates ------------------------------------


def test_read_all_up_to_a_watermark_marks_only_up_to_it_while_creates_race(
    serve: Callable[[Config], str],
    make_config: Callable[..., Config],
    make_user: Callable[..., str],
) -> None:
    """One thread creates notifications one after the other while readers list the
    newest few and mark read up to one of them. Nothing is capped or deleted, so the
    creator's order is the array's order, and every watermark stays in the inbox.

    At the end, with m the position (in creation order) of the newest watermark any
    read-all used: the notifications at or below m are read, those above are unread,
    the read-alls changed m + 1 in total (each was marked exactly once), and each
    read-all's answer had everything at or below its own watermark read.
    """
    creates, tail, readers = 60, 10, 3
    base = serve(make_config(notifications_limit=100))
    user = make_user()
    created: list[str] = []
    stop = threading.Event()
    calls: list[tuple[str, int, dict[str, Any]]] = []  # (watermark, status, body)
    lock = threading.Lock()

    def creator() -> None:
        try:
            with requests.Session() as session:
                for i in range(creates):
                    body: dict[str, Any] = {"user_id": user, "key": "new_message", "data": {"i": i}}
                    response = session.post(f"{base}/create", json=body, timeout=TIMEOUT)
                    created.append(created_id(response))
                    if i == creates - tail:
                        stop.set()  # the last ones still race the readers' last calls
        finally:
            stop.set()

    def reader(seed: int) -> Callable[[], None]:
        rng = random.Random(seed)

        def run() -> None:
            with requests.Session() as session:
                while not stop.is_set():
                    page = session.get(
                        f"{base}/list", params={"user_id": user, "limit": "3"}, timeout=TIMEOUT
                    ).json()["data"]
                    if not page["list"]:
                        time.sleep(0.005)
                        continue
                    # Mostly the newest seen, sometimes an older one: watermarks need
                    # not grow, and an older one must unmark nothing.
                    mark = rng.choice([page["list"][0]["id"], page["list"][-1]["id"]])
                    response = session.post(
                        f"{base}/read-all", json={"user_id": user, "up_to": mark}, timeout=TIMEOUT
                    )
                    with lock:
                        calls.append((mark, response.status_code, response.json()))

        return run

    run_together(creator, *(reader(seed) for seed in range(readers)))
    with requests.Session() as session:
        # One more, after every read-all: above every watermark, whatever the timing.
        last = session.post(
            f"{base}/create", json={"user_id": user, "key": "new_post"}, timeout=TIMEOUT
        )
        created.append(created_id(last))
        final = inbox(session, base, user)
        final_counts = counts(session, base, user)

    position = {notification_id: i for i, notification_id in enumerate(created)}
    assert len(calls) >= 5, "the readers hardly ran: no race was tested"
    for mark, status, body in calls:
        assert status == 200, body  # the watermark is never gone
        data = body["data"]
        below = position[mark] + 1  # the watermark and the older ones, all read now
        assert data["elements"] >= below
        assert data["new"] <= data["elements"] - below, (mark, data)
        assert data["changed"] >= 0
    newest_mark = max(position[mark] for mark, _, _ in calls)
    assert [n["id"] for n in final["list"]] == created[::-1]
    flags = {n["id"]: n["is_new"] for n in final["list"]}
    assert [flags[n] for n in created] == [i > newest_mark for i in range(len(created))]
    assert sum(body["data"]["changed"] for _, _, body in calls) == newest_mark + 1
    unread = len(created) - newest_mark - 1
    assert (final["elements"], final["new"]) == (len(created), unread)
    assert final_counts == (len(created), unread)


# --- fan-outs racing single creates under a small cap -------------------------------


@dataclass(frozen=True)
class Write:
    """One notification the API answered 201 for, and when the call was in flight."""

    user_id: str
    notification_id: str
    sent: float
    answered: float


def test_fan_outs_and_single_creates_on_the_same_users_keep_the_last_cap(
    serve: Callable[[Config], str],
    make_config: Callable[..., Config],
    make_user: Callable[..., str],
) -> None:
    """Single creates and fan-outs to the same users at once, with a cap of 20.

    Per user at the end: exactly min(cap, 201s) notifications, no id twice, each one
    an id some 201 returned, none read (`new` is the size, /count agrees); and the
    array is the newest `cap` in an order that agrees with real time: when one call
    was answered before another was sent, the later one is listed above the earlier
    one, and if the earlier one is still there, so is the later.
    """
    cap, users_n = 20, 4
    single_threads, singles_each = 4, 20
    fan_threads, fans_each = 2, 12
    base = serve(make_config(notifications_limit=cap))
    users = [make_user() for _ in range(users_n)]
    writes: list[Write] = []
    lock = threading.Lock()
    start = threading.Barrier(single_threads + fan_threads, timeout=30)

    def singles(seed: int) -> Callable[[], None]:
        rng = random.Random(seed)

        def run() -> None:
            with requests.Session() as session:
                start.wait()
                for _ in range(singles_each):
                    user = rng.choice(users)
                    key = rng.choice(["new_post", "new_message"])
                    sent = time.monotonic()
                    response = session.post(
                        f"{base}/create", json={"user_id": user, "key": key}, timeout=TIMEOUT
                    )
                    answered = time.monotonic()
                    with lock:
                        writes.append(Write(user, created_id(response), sent, answered))

        return run

    def fan_outs(seed: int) -> Callable[[], None]:
        rng = random.Random(1000 + seed)

        def run() -> None:
            with requests.Session() as session:
                start.wait()
                for _ in range(fans_each):
                    chosen = rng.sample(users, rng.randint(1, users_n))
                    sent = time.monotonic()
                    response = session.post(
                        f"{base}/create",
                        json={"user_ids": chosen, "key": "new_post"},
                        timeout=TIMEOUT,
                    )
                    answered = time.monotonic()
                    assert response.status_code == 201, response.text
                    results = response.json()["data"]["results"]
                    assert [r["status"] for r in results] == ["created"] * len(chosen)
                    assert [r["user_id"] for r in results] == chosen
                    with lock:
                        writes.extend(
                            Write(r["user_id"], r["notification_id"], sent, answered)
                            for r in results
                        )

        return run

    run_together(
        *(singles(seed) for seed in range(single_threads)),
        *(fan_outs(seed) for seed in range(fan_threads)),
    )
    assert len({w.notification_id for w in writes}) == len(writes)  # ids are unique
    with requests.Session() as session:
        for user in users:
            mine = [w for w in writes if w.user_id == user]
            page = inbox(session, base, user)
            listed = [n["id"] for n in page["list"]]
            size = min(cap, len(mine))
            assert len(listed) == size, (len(mine), len(listed))
            assert len(set(listed)) == size
            returned = {w.notification_id for w in mine}
            assert set(listed) <= returned
            assert all(n["is_new"] and n["user_id"] == user for n in page["list"])
            assert (page["elements"], page["new"]) == (size, size)
            assert counts(session, base, user) == (size, size)
            where = {notification_id: i for i, notification_id in enumerate(listed)}
            for earlier in mine:
                for later in mine:
                    if earlier.answered >= later.sent or earlier.notification_id not in where:
                        continue
                    # `later` was sent after `earlier` was answered: it is newer.
                    assert later.notification_id in where, (earlier, later)
                    assert where[later.notification_id] < where[earlier.notification_id]
    assert len(writes) > users_n * cap, "the cap was never reached"


# --- one Idempotency-Key, twenty requests at once ---------------------------------


def test_twenty_identical_creates_with_one_idempotency_key_at_once_act_once(
    serve: Callable[[Config], str],
    config: Config,
    make_user: Callable[..., str],
    db: Any,
) -> None:
    """Twenty threads send the same new_login create with the same Idempotency-Key at
    the same moment: one notification, one outbox record; every answer is the first
    201, a replay of it (`Idempotent-Replay: true`), or 409 `idempotency_key_in_use`."""
    threads = 20
    base = serve(config)
    user = make_user()
    body: dict[str, Any] = {"user_id": user, "key": "new_login", "data": {"ip": "10.0.0.9"}}
    headers = {"Idempotency-Key": f"login-{user}"}
    start = threading.Barrier(threads, timeout=30)
    answers: list[tuple[int, requests.structures.CaseInsensitiveDict[str], Any]] = []
    lock = threading.Lock()

    def send() -> None:
        with requests.Session() as session:
            start.wait()
            response = session.post(f"{base}/create", json=body, headers=headers, timeout=TIMEOUT)
            with lock:
                answers.append((response.status_code, response.headers, response.json()))

    run_together(*(send for _ in range(threads)))
    assert len(answers) == threads
    first = [a for s, h, a in answers if s == 201 and "Idempotent-Replay" not in h]
    assert len(first) == 1, answers
    for status, response_headers, answer in answers:
        if status == 201:
            assert answer == first[0]
            if answer is not first[0]:
                assert response_headers["Idempotent-Replay"] == "true"
        else:
            assert status == 409, answer
            assert answer["success"] is False
            assert answer["error"]["code"] == "idempotency_key_in_use"
            assert response_headers["Retry-After"]
    data = first[0]["data"]
    stored = db.users.find_one({"_id": ObjectId(user)})["notifications"]
    assert [n["id"] for n in stored] == [data["notification_id"]]
    outbox = list(db.email_outbox.find())
    assert [str(record["_id"]) for record in outbox] == [data["email_id"]]
    assert outbox[0]["notification_id"] == data["notification_id"]
    # Once it is done, the key answers the first 201 again.
    again = requests.post(f"{base}/create", json=body, headers=headers, timeout=TIMEOUT)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replay"] == "true"
    assert again.json() == first[0]
    with requests.Session() as session:
        assert counts(session, base, user) == (1, 1)
