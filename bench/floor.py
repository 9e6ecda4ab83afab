"""The floor: a one-line Flask JSON endpoint behind the service's server and front."""

from flask import Flask

from notification_service.asgi import BufferedWsgi
from notification_service.config import Config

app = Flask(__name__)
app.get("/")(lambda: {"ok": True})


def create_asgi_app() -> BufferedWsgi:
    config = Config.from_env()
    timeout, threads = config.client_timeout_seconds, config.web_threads
    return BufferedWsgi(
        app, max_body_bytes=config.max_body_bytes, body_timeout=timeout, threads=threads
    )
