"""Storage operations and database faults, against real SecantusDB servers."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

import pytest
from bson import ObjectId
from conftest import MongoServer, free_port
from flask import Flask
from pymongo.errors import AutoReconnect, OperationFailure

from notification_service.config import Config
from notification_service.storage.mongo_connector import (
    DatabaseUnavailable,
    guarded,
)

NOW = datetime(2026, 11, 28, tzinfo=UTC)


def test_database_name_comes_from_the_uri_path() -> None:
    assert Config(db_uri="mongodb://h:1/app?x=1").database_name == "app"
    assert Config(db_uri="mongodb://h:1/").database_name == "notifications"
    assert Config(db_uri="mongodb://h:1").database_name == "notifications"


# --- faults: bounded waits, 503 with Retry-After, recovery --------------------------


def test_frozen_database_gives_503_within_the_timeout_then_recovers(
    own_server: MongoServer, make_app: Callable[..., Flask], make_user: Callable[..., str]
) -> None:
    config = Config(db_uri=own_server.uri("frozen"), dispatcher_threads=0, db_timeout_ms=1500)
    client = make_app(config).test_client()
    user_id = str(ObjectId())
    assert client.post("/create", json={"user_id": user_id, "key": "new_post"}).status_code == 404

    own_server.freeze()
    try:
        for request in (
            lambda: client.get(f"/list?user_id={user_id}"),
            lambda: client.post("/create", json={"user_id": user_id, "key": "new_post"}),
        ):
            started = time.monotonic()
            response = request()
            elapsed = time.monotonic() - started
            assert response.status_code == 503
            assert response.headers["Retry-After"] == "2"
            assert response.get_json()["error"]["code"] == "database_unavailable"
            assert elapsed < 5, f"took {elapsed:.1f}s"
    finally:
        own_server.thaw()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        response = client.get(f"/list?user_id={user_id}")
        if response.status_code != 503:
            break
        time.sleep(0.2)
    assert response.status_code == 404  # answered again: the user just does not exist


def test_unreachable_database_gives_503_quickly(make_app: Callable[..., Flask]) -> None:
    config = Config(
        db_uri=f"mongodb://127.0.0.1:{free_port()}/none", dispatcher_threads=0, db_timeout_ms=1000
    )
    started = time.monotonic()
    client = make_app(config).test_client()  # starts even though the database is down
    response = client.get(f"/list?user_id={ObjectId()}")
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert time.monotonic() - started < 6


def test_guarded_maps_outages_to_503_and_lets_bugs_through() -> None:
    @guarded
    def outage() -> None:
        raise AutoReconnect("connection reset")

    @guarded
    def bug() -> None:
        raise OperationFailure("unknown operator: $foo", code=2)

    with pytest.raises(DatabaseUnavailable):
        outage()
    with pytest.raises(OperationFailure):
        bug()
