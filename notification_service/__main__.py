"""Command line: `serve` (what `make run` calls), `worker`, `sink`, `check-config`,
`openapi`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

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
# prometheus-client's own variable (it reads it itself): the directory where each
# process writes its metrics, so that a scrape of any web worker sums them all.
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


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
    commands.add_parser("openapi", help="print the OpenAPI document of the default configuration")
    args = parser.parse_args(argv)
    if args.command == "openapi":
        print_openapi()  # the environment's settings play no part: docs/openapi.json is this
        return 0

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


def print_openapi() -> None:
    """Print the document of the default configuration (docs/openapi.json is this)."""
    from .notification_handler import api
    from .openapi import document

    print(json.dumps(document(api.endpoints, Config()), indent=2, ensure_ascii=False))


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
    from .storage.mongo_connector import check_uri

    if config.db_uri:
        check_uri(config)
    EmailTemplates(config.templates_dir, config.keys)


def web_server_argv(config: Config, log_config: Path | None = None) -> list[str]:
    """granian's command line; `log_config`: a file of `logs.granian_log_config`, so
    that granian's own lines are in LOG_FORMAT too."""
    # granian reads each request's headers in Rust under a timeout, and asgi.py reads the
    # body on the event loop under the same timeout: a slow client holds a socket, never
    # one of the WEB_THREADS threads that run the app (docs/measurements-history.md).
    logging_argv = [] if log_config is None else ["--log-config", str(log_config)]
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
        *logging_argv,
        "notification_service.asgi:create_asgi_app",
    ]  # fmt: skip


def prepare_web_server(config: Config, env: dict[str, str], run_dir: Path) -> list[str]:
    """Make what the web server needs in `run_dir` and `env`; return its command line.

    - granian's logging configuration, in LOG_FORMAT (`logging.json`).
    - PROMETHEUS_MULTIPROC_DIR, unless the operator set it: `run_dir/metrics`, emptied,
      since the files of an earlier run's processes would be summed with this one's.
      An operator's own directory is theirs to empty before each start.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_config = run_dir / "logging.json"
    log_config.write_text(json.dumps(logs.granian_log_config(config.log_format or "json")))
    if not env.get(METRICS_DIR_VARIABLE):
        metrics_dir = run_dir / "metrics"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        env[METRICS_DIR_VARIABLE] = str(metrics_dir)
    return web_server_argv(config, log_config)


def production_run_dir(port: int) -> Path:
    """The web server's run directory of a production start on `port`, emptied: each
    start replaces the last one's instead of leaving one more behind in the system's
    temporary folder (there is no exit to clean up after: serve becomes granian).

    :raise ConfigError: the path is a link or another user's (a name anyone can guess
        must not let another local user choose what granian reads or where it writes).
    """
    path = Path(tempfile.gettempdir()) / f"notification-service-{port}"
    refused = ConfigError(f"PORT: {path} exists and is not this user's own directory")
    if path.is_symlink() or (path.exists() and path.stat().st_uid != os.getuid()):
        raise refused
    shutil.rmtree(path, ignore_errors=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:  # made by someone else in between
        raise refused from None
    return path


def serve(config: Config) -> int:
    """Serve the API; start the embedded database and mail sink where none is configured."""
    _check_dependencies(config)  # before anything is started
    data_dir = Path(config.data_dir).resolve()
    env = dict(os.environ)
    if config.db_uri and config.smtp_host:
        log.info("database: %s", config.db_uri)  # its password is held apart
        log.info("mail: SMTP %s:%d", config.smtp_host, config.resolved_smtp_port)
        log.info("serving on http://%s:%d", config.host, config.port)
        # Nothing is left to clean up once we become granian; a read-only image still
        # has a writable temporary directory.
        argv = prepare_web_server(config, env, production_run_dir(config.port))
        # The web server gets our pid and our signals directly.
        os.execve(argv[0], argv, env)

    from . import embedded

    run_dir = data_dir / "run"
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
            log.info("database: %s", config.db_uri)  # its password is held apart
        else:
            db_child, env["DB_URI"] = embedded.start_database(data_dir / "db", run_dir)
            children.append(db_child)
            log.info(
                "database: embedded SecantusDB at %s, data in %s", env["DB_URI"], data_dir / "db"
            )
        if config.smtp_host:
            log.info("mail: SMTP %s:%d", config.smtp_host, config.resolved_smtp_port)
        else:
            mail_dir = data_dir / "mail"
            sink_child, port = embedded.start_mail_sink(mail_dir, run_dir)
            children.append(sink_child)
            env.update(SMTP_HOST="127.0.0.1", SMTP_PORT=str(port), SMTP_SECURITY="none")
            log.info("mail: local sink on 127.0.0.1:%d, saving .eml files in %s", port, mail_dir)
        # A web server a crash left behind would go on writing into the metrics
        # directory about to be emptied: stopped first (spawn would, but later).
        embedded.kill_stale(run_dir / "web.pid")
        web = embedded.spawn("web", prepare_web_server(config, env, run_dir), run_dir, env)
        children.append(web)
        log.info("serving on http://%s:%d (Ctrl-C stops everything)", config.host, config.port)
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
        log.error("%s", exc)
        return 1
    finally:
        # The web server first, so in-flight requests and sends finish against a live
        # database and sink; the database last.
        for child in reversed(children):
            # The web server gets its graceful timeout and a margin.
            child.stop(timeout=GRACEFUL_SECONDS + 15 if child.name == "web" else 15)
        log.info("stopped")


def run_worker(config: Config, threads: int) -> int:
    """Dispatch the outbox until SIGINT/SIGTERM, then finish in-flight sends."""
    from .runtime import build_runtime

    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    # Its figures reach a scrape only through a PROMETHEUS_MULTIPROC_DIR it shares with
    # a web server: a worker serves no HTTP.
    runtime = build_runtime(config, dispatcher_threads=threads)
    dispatchers = runtime.dispatchers.threads if runtime.dispatchers is not None else []
    log.info("worker dispatching with %d thread(s)", threads)
    last: dict[str, int] | None = None
    next_report = time.monotonic()
    try:
        while not stop.wait(1.0):
            if not all(t.is_alive() for t in dispatchers):
                return 1
            if time.monotonic() >= next_report:
                next_report += PROGRESS_SECONDS
                last = _log_progress(runtime.services.outbox, last)
    finally:
        started = time.monotonic()
        runtime.close()
        log.info("worker stopped in %.1fs", time.monotonic() - started)
    return 0


def _log_progress(outbox: Outbox, last: dict[str, int] | None) -> dict[str, int] | None:
    """Log the outbox backlog when it changed, so a long drain shows its progress."""
    from .storage.mongo_connector import DatabaseUnavailable

    try:
        backlog = outbox.backlog()
    except DatabaseUnavailable:
        log.warning("outbox backlog unknown: the database is not answering")
        return last
    if backlog != last and (last is not None or any(backlog.values())):
        log.info(
            "outbox backlog: %d queued, %d sending, %d digests scheduled",
            backlog["queued"],
            backlog["sending"],
            backlog["scheduled"],
        )
    return backlog


if __name__ == "__main__":
    sys.exit(main())
