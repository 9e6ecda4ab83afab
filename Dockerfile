# Untested here (no Docker engine on the development machine); kept simple on purpose.
#   docker build -t notification-service . && docker run -p 5000:5000 --env-file .env notification-service
# The .env must set DB_URI (the image has no embedded database); without SMTP_HOST
# mail goes to the local sink inside the container (/app/var/mail).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0 \
    PORT=5000

WORKDIR /app
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt
COPY pyproject.toml README.md ./
COPY notification_service ./notification_service
RUN pip install --no-cache-dir --no-deps . && useradd --create-home app && chown app /app
USER app

EXPOSE 5000
# `serve` replaces itself with gunicorn when DB_URI and SMTP_HOST are set, so
# gunicorn is PID 1 and gets docker's SIGTERM directly.
CMD ["python", "-m", "notification_service", "serve"]
