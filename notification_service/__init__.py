"""notification-service: notifications inside the user's document, email via an outbox."""

__version__ = "0.1.0"
