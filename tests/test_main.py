"""`serve` as `make run` uses it: embedded database and mail sink, clean stops, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port

from notification_service.__main__ import main
from notification_service.embedded import alive

USER = "638f394d4b7243fc0399ea67"


def start_serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SMTP_", "DISPATCH"))}
    env.update(PORT=str(port), DATA_DIR=str(data_dir), EMAIL="test@example.com", WEB_WORKERS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "notification_service", "serve"], env=env, cwd=data_dir
    )


def call(port: int, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def wait_serving(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "serve exited"
        try:
            call(port, "GET", f"/list?user_id={USER}")
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("serve did not answer in time")


def child_pids(data_dir: Path) -> list[int]:
    return [int(p.read_text().split()[0]) for p in (data_dir / "run").glob("*.pid")]


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def test_serve_runs_everything_and_ctrl_c_stops_it_all(tmp_path: Path) -> None:
    port = free_port()
    process = start_serve(tmp_path, port)
    try:
        wait_serving(port, process)
        pids = child_pids(tmp_path)
        assert len(pids) == 3  # database, mail sink, web server
        status, body = call(port, "POST", "/create", {"user_id": USER, "key": "registration"})
        assert status == 201 and body["success"] is True
        deadline = time.monotonic() + 15
        while not list((tmp_path / "mail").glob("*.eml")):
            assert time.monotonic() < deadline, "no .eml file appeared"
            time.sleep(0.1)
        [eml] = (tmp_path / "mail").glob("*.eml")
        assert b"registration" in eml.read_bytes()
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0
        wait_gone(pids)
        assert child_pids(tmp_path) == []
    finally:
        if process.poll() is None:
            process.kill()


def test_serve_starts_again_after_a_crash_and_keeps_data(tmp_path: Path) -> None:
    port = free_port()
    process = start_serve(tmp_path, port)
    try:
        wait_serving(port, process)
        assert call(port, "POST", "/create", {"user_id": USER, "key": "new_post"})[0] == 201
        pids = child_pids(tmp_path)
        process.kill()  # no chance to clean up: the children must not outlive it
        process.wait()
        wait_gone(pids)
        process = start_serve(tmp_path, port)
        wait_serving(port, process)
        status, body = call(port, "GET", f"/list?user_id={USER}")
        assert status == 200 and body["data"]["elements"] == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


def test_invalid_configuration_stops_the_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PORT", "eighty")
    assert main(["check-config"]) == 2
    assert "PORT" in capsys.readouterr().err


def test_serve_with_database_and_smtp_settings_delivers_there(
    tmp_path: Path, db_uri: str, smtp_server: Any
) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DB_", "SMTP_", "DISPATCH"))}
    env.update(
        smtp_server.env(), PORT=str(port), DB_URI=db_uri, EMAIL="test@example.com", WEB_WORKERS="1"
    )
    process = subprocess.Popen(
        [sys.executable, "-m", "notification_service", "serve"], env=env, cwd=tmp_path
    )
    try:
        wait_serving(port, process)
        assert not (tmp_path / "var").exists()  # nothing embedded was started
        assert call(port, "POST", "/create", {"user_id": USER, "key": "registration"})[0] == 201
        [received] = smtp_server.wait_for_messages(1, timeout=15)
        assert "registration" in received.message["Subject"]
        process.send_signal(signal.SIGTERM)  # gunicorn itself: serve replaced itself with it
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [("0.0.0.0", (), True), ("::", (), True), ("10.1.2.3", (), True),
     ("0.0.0.0", ("k" * 16,), False), ("127.0.0.1", (), False), ("::1", (), False),
     ("localhost", (), False)],
)  # fmt: skip
def test_serving_beyond_loopback_without_api_keys_warns(
    capsys: pytest.CaptureFixture[str], host: str, keys: tuple[str, ...], warned: bool
) -> None:
    from notification_service.__main__ import _warn_if_open
    from notification_service.config import Config

    _warn_if_open(Config(host=host, api_keys=keys))
    err = capsys.readouterr().err
    assert ("without API_KEYS" in err) is warned
