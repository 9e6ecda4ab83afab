# Untested here (no Docker engine on the development machine); kept simple on purpose.
#   docker build -t notification-service .
#   docker run -p 5000:5000 --env-file .env --stop-timeout 40 notification-service
# (--stop-timeout: SIGTERM drains for up to 30 s, docker's default is to SIGKILL at 10 s.)
# The .env must set DB_URI (the image has no embedded database) and SMTP_HOST (or
# DEV_MAIL_SINK=true to keep mail in the container's /app/var/mail on purpose), and
# API_KEYS: the container listens on every interface, and refuses to start without a
# key (ALLOW_UNAUTHENTICATED=true says "open" on purpose).
# Pinned: a rebuild gets the same base until someone moves the tag on purpose.
FROM python:3.11.10-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=5000

WORKDIR /app
# The runtime dependencies exactly as locked (`make lock`): pinned, hash-checked, and
# nothing pip would pick on its own; then the package itself, which adds none.
COPY requirements.lock ./
RUN pip install --no-cache-dir --require-hashes --no-deps -r requirements.lock
COPY pyproject.toml README.md ./
COPY notification_service ./notification_service
RUN pip install --no-cache-dir --no-deps . && pip check \
    && useradd --create-home app && chown app /app
USER app

EXPOSE 5000
# Liveness only: /health answers without the database and without an API key.
HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ.get(\"PORT\", \"5000\")}/health', timeout=2)"
# `serve` replaces itself with granian when DB_URI and SMTP_HOST are set, so granian
# is PID 1 and gets docker's SIGTERM directly.
CMD ["python", "-m", "notification_service", "serve"]
