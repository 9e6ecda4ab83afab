"""Prometheus metrics: `GET /metrics` in the text format, through prometheus-client.

Two kinds of values:

- What processes count (requests, notifications created, email outcomes, claimed
  batches, SMTP exchanges): counters and histograms. With PROMETHEUS_MULTIPROC_DIR set
  (`serve` sets it for the web server it starts; a `worker` uses it when set), each
  process writes them to its own files in that directory and a scrape sums the files
  of every process that ever wrote there, live or gone, so the answer is the same
  whichever web worker serves the scrape, and a `worker` sharing the directory shows
  its dispatchers' figures too. Without it (tests building the app in-process), this
  process's own values.
- What the deployment holds (the outbox's depth, its oldest due email's wait, whether
  the database answers): read from the database at each scrape, under a short deadline
  of its own, so they are right for the whole deployment and never go stale with the
  process that last set them. When that read fails, `database_up` is 0, the outbox
  figures are left out (unknown, not 0), and the rest is answered all the same.

Every label value comes from a closed set (route templates, known methods, the
notification keys, the app's own status codes, the dispatcher's outcomes): a hostile
caller cannot make new series by sending odd paths or methods.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .dispatcher import DispatchEvents, SendOutcome
from .keys import DEFAULT_KEYS, KeyTable
from .storage.mongo_connector import DatabaseUnavailable, with_own_deadline

if TYPE_CHECKING:
    # Imported where used: notifications.py counts through this module.
    from .notifications import Services

log = logging.getLogger(__name__)

PREFIX = "notification_service_"
# The database's share of a scrape: Prometheus's own scrape timeout is 10 s by default,
# and a scrape must answer (with database_up 0) while the database does not.
SCRAPE_DB_SECONDS = 1.0
# Methods a route may be asked with; any other word a client sends is `other`.
KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# The route label of a request that matched no route (404, 405): never its path.
UNMATCHED = "unmatched"
OUTCOMES: tuple[SendOutcome, ...] = ("sent", "retry", "failed")

# This process's values when it is not in multiprocess mode (see `scrape`).
_process = CollectorRegistry()

REQUESTS = Counter(
    f"{PREFIX}http_requests",
    "HTTP requests answered, by method, route template and status.",
    ["method", "route", "status"],
    registry=_process,
)
REQUEST_SECONDS = Histogram(
    f"{PREFIX}http_request_duration_seconds",
    "Time from a request's arrival (its body read whole) to its answer.",
    ["method", "route"],
    registry=_process,
)
NOTIFICATIONS = Counter(
    f"{PREFIX}notifications_created",
    "Notifications created (POST /create, one per user of a fan-out), by key.",
    ["key"],
    registry=_process,
)
EMAILS = Counter(
    f"{PREFIX}emails",
    "Attempts to send a claimed email, by outcome: sent (accepted by the SMTP server), "
    "retry (to be tried again), failed (for good).",
    ["outcome"],
    registry=_process,
)
BATCH_SIZE = Histogram(
    f"{PREFIX}dispatcher_batch_size",
    "Emails a dispatcher claimed at once (claims that found nothing due are left out).",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=_process,
)
SMTP_SECONDS = Histogram(
    f"{PREFIX}smtp_send_duration_seconds",
    "Duration of one email's SMTP exchange (connecting included when it opened the "
    "connection), by outcome.",
    ["outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    registry=_process,
)
RESENDS = Counter(
    f"{PREFIX}emails_resent",
    "Failed emails put back in the queue, by how: one (POST /email/<id>/resend) or bulk "
    "(POST /email/failed/resend).",
    ["how"],
    registry=_process,
)
RESEND_KINDS = ("one", "bulk")

# Series that exist from the start, at 0: a rate over a series that appears only with
# its first event misses that event. (Those of the keys, which are configuration, are
# made by DomainEvents, for the app's table.)
for _outcome in OUTCOMES:
    EMAILS.labels(_outcome)
for _how in RESEND_KINDS:
    RESENDS.labels(_how)


def count_resends(how: str, count: int) -> None:
    """Count failed emails requeued by a resend (`how`: one of RESEND_KINDS)."""
    if count > 0:
        RESENDS.labels(how).inc(count)


def multiprocess_mode() -> bool:
    """Whether prometheus-client writes this process's values to PROMETHEUS_MULTIPROC_DIR
    (it decides once, when first imported)."""
    return values.ValueClass is not values.MutexValue


# Each (method, route, status)'s two series: `labels` takes a lock and checks its values
# on every call, and this runs for every request. The labels are a closed set (above).
_request_series: dict[tuple[str, str | None, int], tuple[Counter, Histogram]] = {}


def observe_request(method: str, route: str | None, status: int, seconds: float) -> None:
    """Count one answered request. `route`: the matched URL rule's template
    (`/email/<email_id>`), None when none matched."""
    series = _request_series.get((method, route, status))
    if series is None:
        method_label = method if method in KNOWN_METHODS else "other"
        route_label = route if route is not None else UNMATCHED
        series = (
            REQUESTS.labels(method_label, route_label, str(status)),
            REQUEST_SECONDS.labels(method_label, route_label),
        )
        if method_label != "other":  # a client's own words must not grow the cache
            _request_series[(method, route, status)] = series
    count, duration = series
    count.inc()
    duration.observe(seconds)


class DomainEvents:
    """The domain's reports (notifications.Events), as metrics, labelled by the keys of
    `keys` (the app's table, KEYS_FILE): each key's series exists from the start."""

    def __init__(self, keys: KeyTable = DEFAULT_KEYS) -> None:
        self._created = {spec.name: NOTIFICATIONS.labels(spec.name) for spec in keys}

    def notifications_created(self, key: str, count: int) -> None:
        if count > 0:
            # A key outside the table (none is accepted today) must not become a label.
            series = self._created.get(key)
            (NOTIFICATIONS.labels("other") if series is None else series).inc(count)


class PrometheusEvents(DispatchEvents):
    """The dispatchers' reports, as metrics."""

    def batch_claimed(self, size: int) -> None:
        # An idle dispatcher claims nothing twice a second: those would bury the sizes.
        if size > 0:
            BATCH_SIZE.observe(size)

    def send_finished(self, outcome: SendOutcome, seconds: float | None) -> None:
        EMAILS.labels(outcome).inc()
        if seconds is not None:
            SMTP_SECONDS.labels(outcome).observe(seconds)


class DeploymentCollector(Collector):
    """The figures read from the database at scrape time."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc

    def collect(self) -> Iterator[Any]:
        from .notifications import readiness

        bound = min(SCRAPE_DB_SECONDS, self.svc.config.db_timeout_ms / 1000)
        state = None
        failed = 0
        try:
            # The dead letters' count under the same deadline: one more count, on its index.
            state, failed = with_own_deadline(
                bound, lambda: (readiness(self.svc), self.svc.outbox.dead_letters.count_failed())
            )
        except DatabaseUnavailable:
            pass  # logged where it was raised
        except Exception:  # the scrape must answer whatever the database said
            log.exception("metrics: the outbox could not be read")
        yield GaugeMetricFamily(
            f"{PREFIX}database_up",
            f"1 when the database answered this scrape within {bound:g} s, else 0.",
            value=0 if state is None else 1,
        )
        if state is None:
            return
        outbox = state["outbox"]
        depth = GaugeMetricFamily(
            f"{PREFIX}outbox_emails",
            "Emails in the outbox waiting to be sent (queued) or being sent (sending).",
            labels=["status"],
        )
        depth.add_metric(["queued"], outbox["queued"])
        depth.add_metric(["sending"], outbox["sending"])
        yield depth
        yield GaugeMetricFamily(
            f"{PREFIX}outbox_oldest_due_seconds",
            "How long the longest-waiting due email has been due (0 when none is).",
            value=outbox["oldest_due_seconds"] or 0.0,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}outbox_failed_emails",
            "Failed emails in the outbox (dead letters: GET /email?status=failed), until "
            "resent or removed OUTBOX_RETENTION_DAYS after their failure.",
            value=failed,
        )


class _ProcessCollector(Collector):
    def collect(self) -> Iterator[Any]:
        yield from _process.collect()


# What a scrape answers with: the classic text format, which every Prometheus reads.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


def scrape(svc: Services) -> bytes:
    """The text exposition of every metric: the processes' (summed over the
    multiprocess directory when there is one), then the deployment's."""
    registry = CollectorRegistry()
    if multiprocess_mode():
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        registry.register(_ProcessCollector())
    registry.register(DeploymentCollector(svc))
    return generate_latest(registry)
