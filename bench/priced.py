"""The bench's app factory: the service with one guarantee turned off, to price it.

Each variant is a zero-argument factory that granian calls in each worker
(`--factory priced:no_metrics`). The switches are arguments of the service's own
factories (`create_app(guarantees=Guarantees(metrics=False))`), never environment
variables: the configuration comes from the environment as the service's does, and
nothing a deployment could set turns a guarantee off. `full` is the service itself,
composed here as asgi.create_asgi_app composes it (which takes no guarantees);
`plain_wsgi` is the same Flask app without the slow-client front, for granian's WSGI
interface.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flask import Flask

    from notification_service.asgi import BufferedWsgi
    from notification_service.server import Guarantees

# granian's factory name of each variant, and the guarantee it turns off.
OFF = {
    "no_auth": "auth",
    "no_request_log": "request_log",
    "no_metrics": "metrics",
    "no_deadline": "deadline",
    "no_strict_parsing": "strict_parsing",
}


def front(guarantees: Guarantees) -> BufferedWsgi:
    """asgi.create_asgi_app, with the app's guarantees as given."""
    # Imported here, in the worker: importing this module starts nothing.
    from notification_service import logs
    from notification_service.asgi import BufferedWsgi
    from notification_service.config import Config
    from notification_service.runtime import build_runtime
    from notification_service.server import create_app
    from notification_service.stream_hub import StreamHub

    config = Config.from_env()
    logs.configure(config)  # before the runtime logs its first lines
    runtime = build_runtime(config)
    app = create_app(runtime=runtime, guarantees=guarantees)
    return BufferedWsgi(
        app,
        max_body_bytes=config.max_body_bytes,
        body_timeout=config.client_timeout_seconds,
        threads=config.web_threads,
        on_shutdown=runtime.close,
        streams=StreamHub(runtime.services.store, runtime.clock, config),
    )


def _off(**switches: bool) -> BufferedWsgi:
    from notification_service.server import Guarantees

    return front(Guarantees(**switches))


def full() -> BufferedWsgi:
    """Every guarantee: the service as `make run` serves it."""
    return _off()


def plain_wsgi() -> Flask:
    """Every guarantee, no front: the Flask app as it would be under granian's WSGI."""
    from notification_service.server import create_app

    return create_app()


def no_auth() -> BufferedWsgi:
    return _off(auth=False)


def no_request_log() -> BufferedWsgi:
    return _off(request_log=False)


def no_metrics() -> BufferedWsgi:
    return _off(metrics=False)


def no_deadline() -> BufferedWsgi:
    return _off(deadline=False)


def no_strict_parsing() -> BufferedWsgi:
    return _off(strict_parsing=False)
