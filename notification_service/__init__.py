"""notification-service: in-app notifications inside the user's document, and email via an outbox."""

__version__ = "0.1.0"
