"""The floors: a one-line Flask JSON endpoint, served plainly (`app`: granian in WSGI
mode, as minimal.py) and behind the service's server and front (`create_asgi_app`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from notification_service.asgi import BufferedWsgi

app = Flask(__name__)
app.get("/")(lambda: {"ok": True})


def create_asgi_app() -> BufferedWsgi:
    # Imported here: the plain WSGI floor loads nothing of the service.
    from notification_service.asgi import BufferedWsgi
    from notification_service.config import Config

    config = Config.from_env()
    timeout, threads = config.client_timeout_seconds, config.web_threads
    return BufferedWsgi(
        app, max_body_bytes=config.max_body_bytes, body_timeout=timeout, threads=threads
    )
