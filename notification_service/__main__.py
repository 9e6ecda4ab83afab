"""Command line: `serve` (what `make run` calls), `worker`, `sink`, `check-config`."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import ipaddress
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING
from urllib.parse import urlsplit, urlunsplit

from . import logs
from .config import Config, ConfigError
from .email_templates import TemplateError

if TYPE_CHECKING:
    from .outbox import Outbox

log = logging.getLogger("notification_service")
PROGRESS_SECONDS = 10
# The web server's wait for its workers on SIGTERM. The dispatchers inside a worker stop
# sooner (DispatcherPool.stop's 20 s), so their in-flight sends are recorded.
GRACEFUL_SECONDS = 30


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="notification-service")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "serve",
        help="serve the HTTP API under granian; with DB_URI or SMTP_HOST unset, first "
        "start the embedded database or the local mail sink",
    )
    worker = commands.add_parser("worker", help="run outbox dispatchers only (for scale)")
    worker.add_argument(
        "--threads", type=int, default=None, help="default: DISPATCHER_THREADS or 1"
    )
    sink = commands.add_parser("sink", help="a local SMTP server that saves .eml files")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=int, required=True)
    sink.add_argument("--dir", type=Path, required=True)
    commands.add_parser("check-config", help="validate the configuration and templates")
    args = parser.parse_args(argv)

    try:
        config = log_config_for(Config.from_env(), args.command)
        logs.configure(config)
        if args.command == "serve":
            return serve(config)
        if args.command == "worker":
            return run_worker(config, args.threads or max(1, config.dispatcher_threads))
        if args.command == "sink":
            from .smtp_sink import serve_sink

            serve_sink(args.host, args.port, args.dir)
            return 0
        return check_config(config)
    except (ConfigError, TemplateError) as exc:
        problems = exc.problems if isinstance(exc, ConfigError) else [str(exc)]
        if len(problems) == 1:
            print(f"configuration error: {problems[0]}", file=sys.stderr)
        else:
            print(f"{len(problems)} configuration errors:", *problems, sep="\n  ", file=sys.stderr)
        return 2


def log_config_for(config: Config, command: str) -> Config:
    """`config` with the LOG_FORMAT of `command` when the variable is not set: text for
    what `make run` starts (`serve` without DB_URI, its `sink`), which writes to a
    terminal; JSON otherwise. `serve` passes it on to the web server it starts."""
    if config.log_format is None and (
        command == "sink" or (command == "serve" and not config.db_uri)
    ):
        return dataclasses.replace(config, log_format="text")
    return config


def check_config(config: Config) -> int:
    _check_dependencies(config)
    print("configuration and templates are valid")
    return 0


def _check_dependencies(config: Config) -> None:
    """What the environment alone cannot validate: DB_URI's form and the templates.

    :raise ConfigError: / :raise TemplateError: naming the variable.
    """
    from .email_templates import EmailTemplates
    from .mongo_connector import check_uri

    if config.db_uri:
        check_uri(config)
    EmailTemplates(config.templates_dir)


def web_server_argv(config: Config) -> list[str]:
    # granian reads each request's headers in Rust under a timeout, and asgi.py reads the
    # body on the event loop under the same timeout: a slow client holds a socket, never
    # one of the WEB_THREADS threads that run the app (bench/README.md has the figures).
    return [
        sys.executable, "-m", "granian",
        "--interface", "asgi",
        "--factory",
        "--host", config.host,
        "--port", str(config.port),
        "--workers", str(config.web_workers),
        "--http1-header-read-timeout", str(round(config.client_timeout_seconds * 1000)),
        "--workers-kill-timeout", str(GRACEFUL_SECONDS),
        # Streams are requests too: room for STREAM_MAX_PER_PROCESS of them beside what
        # granian lets each worker run at once by default (backlog 1024 / workers);
        # without it 512 streams would block every other request of a worker.
        "--backpressure", str(config.stream_max_per_process + 1024 // config.web_workers),
        "--no-ws",
        "--log-level", config.log_level.lower(),
        "notification_service.asgi:create_asgi_app",
    ]  # fmt: skip


def _warn_if_open(config: Config) -> None:
    if config.api_keys:
        return
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(config.host).is_loopback:
            return
    if config.host == "localhost":
        return
    print(
        f"warning: listening on {config.host} without API_KEYS: anyone who reaches port "
        f"{config.port} can read and change every user's notifications and send email",
        file=sys.stderr,
        flush=True,
    )


def serve(config: Config) -> int:
    """Serve the API; start the embedded database and mail sink where none is configured."""
    _check_dependencies(config)  # before anything is started
    _warn_if_open(config)
    data_dir = Path(config.data_dir).resolve()
    if config.db_uri and config.smtp_host:
        print(f"database: {_redact(config.db_uri)}", flush=True)
        print(f"mail: SMTP {config.smtp_host}:{config.resolved_smtp_port}", flush=True)
        print(f"serving on http://{config.host}:{config.port}", flush=True)
        argv = web_server_argv(config)
        os.execv(argv[0], argv)  # the web server gets our pid and our signals directly

    from . import embedded

    run_dir = data_dir / "run"
    env = dict(os.environ)
    if config.log_format is not None:
        env["LOG_FORMAT"] = config.log_format  # the text default of `make run` included
    children: list[embedded.Child] = []
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        if config.db_uri:
            print(f"database: {_redact(config.db_uri)}", flush=True)
        else:
            db_child, env["DB_URI"] = embedded.start_database(data_dir / "db", run_dir)
            children.append(db_child)
            print(
                f"database: embedded SecantusDB at {env['DB_URI']}, data in {data_dir / 'db'}",
                flush=True,
            )
        if config.smtp_host:
            print(f"mail: SMTP {config.smtp_host}:{config.resolved_smtp_port}", flush=True)
        else:
            mail_dir = data_dir / "mail"
            sink_child, port = embedded.start_mail_sink(mail_dir, run_dir)
            children.append(sink_child)
            env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_SECURITY="none")
            print(
                f"mail: local sink on 127.0.0.1:{port}, saving .eml files in {mail_dir}",
                flush=True,
            )
        web = embedded.spawn("web", web_server_argv(config), run_dir, env)
        children.append(web)
        print(
            f"serving on http://{config.host}:{config.port} (Ctrl-C stops everything)", flush=True
        )
        while not stop.is_set():
            for child in children:
                if child.process.poll() is not None:
                    log.error(
                        "%s exited with status %s; stopping", child.name, child.process.returncode
                    )
                    return 1
            stop.wait(0.5)
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        # The web server first, so in-flight requests and sends finish against a live
        # database and sink; the database last.
        for child in reversed(children):
            # The web server gets its graceful timeout and a margin.
            child.stop(timeout=GRACEFUL_SECONDS + 15 if child.name == "web" else 15)
        print("stopped", flush=True)


def run_worker(config: Config, threads: int) -> int:
    """Dispatch the outbox until SIGINT/SIGTERM, then finish in-flight sends."""
    from .dispatcher import DispatchContext, DispatcherPool
    from .server import build_runtime

    runtime = build_runtime(config)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    services = runtime.services
    context = DispatchContext(
        config, services.outbox, services.clock, services.store.has_notification
    )
    pool = DispatcherPool.start(context, threads)
    log.info("worker dispatching with %d thread(s)", threads)
    last: dict[str, int] | None = None
    next_report = time.monotonic()
    try:
        while not stop.wait(1.0):
            if not all(t.is_alive() for t in pool.threads):
                return 1
            if time.monotonic() >= next_report:
                next_report += PROGRESS_SECONDS
                last = _log_progress(runtime.services.outbox, last)
    finally:
        started = time.monotonic()
        runtime.dispatchers = pool
        runtime.close()
        log.info("worker stopped in %.1fs", time.monotonic() - started)
    return 0


def _log_progress(outbox: Outbox, last: dict[str, int] | None) -> dict[str, int] | None:
    """Log the outbox backlog when it changed, so a long drain shows its progress."""
    from .mongo_connector import DatabaseUnavailable

    try:
        backlog = outbox.backlog()
    except DatabaseUnavailable:
        log.warning("outbox backlog unknown: the database is not answering")
        return last
    if backlog != last and (last is not None or any(backlog.values())):
        log.info("outbox backlog: %d queued, %d sending", backlog["queued"], backlog["sending"])
    return backlog


def _redact(uri: str) -> str:
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


if __name__ == "__main__":
    sys.exit(main())
