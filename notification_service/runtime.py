"""What one process holds, web or worker alike: its MongoDB client, the services, the
clock, the outbox dispatcher threads and the fan-out slots. Knows nothing of Flask.

Nothing is created at import: `build_runtime` makes the client, so that each process of
a pre-forking server gets its own after the fork (pymongo's client is not fork-safe).
"""

from __future__ import annotations

import atexit
import logging
import threading
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .clock import SYSTEM_CLOCK, Clock
from .config import Config
from .digests import Digests
from .dispatcher import DispatchContext, DispatcherPool
from .email_templates import EmailTemplates
from .notifications import Services
from .outbox import Outbox
from .storage.idempotency_store import IdempotencyStore
from .storage.inbox_store import InboxStore
from .storage.mongo_connector import DatabaseUnavailable, connect, database
from .storage.preference_store import PreferenceStore

log = logging.getLogger(__name__)


@dataclass
class Runtime:
    """What one process holds: its client, the services, its clock, its dispatcher
    threads, and `fan_outs`: one slot per fan-out it may run at once (fan_out_limit)."""

    services: Services
    client: Any
    clock: Clock = SYSTEM_CLOCK
    dispatchers: DispatcherPool | None = None
    closed: bool = field(default=False)
    fan_outs: threading.BoundedSemaphore = field(init=False)

    def __post_init__(self) -> None:
        self.fan_outs = threading.BoundedSemaphore(fan_out_limit(self.config.web_threads))

    @property
    def config(self) -> Config:
        return self.services.config

    def dispatch_context(self) -> DispatchContext:
        """What this process's dispatchers share; their reports go to the metrics."""
        svc = self.services
        return DispatchContext(
            svc.config,
            svc.outbox,
            self.clock,
            svc.store.has_notification,
            events=metrics.PrometheusEvents(),
            digests=Digests.of(svc.config, svc.outbox, svc.templates, svc.preferences),
        )

    def close(self) -> None:
        """Stop the dispatchers (finishing in-flight sends), then close the client."""
        if self.closed:
            return
        self.closed = True
        if self.dispatchers is not None:
            self.dispatchers.stop()
        self.client.close()


def fan_out_limit(web_threads: int) -> int:
    """How many fan-outs a process runs at once: half its threads, at least one.

    A fan-out holds its thread for up to ten times DB_TIMEOUT_MS; the other half stays
    for the short requests, which a burst of fan-outs would otherwise queue behind.
    """
    return max(1, web_threads // 2)


def build_runtime(
    config: Config, *, clock: Clock = SYSTEM_CLOCK, dispatcher_threads: int | None = None
) -> Runtime:
    """Connect and assemble the services; start `dispatcher_threads` outbox dispatchers
    (DISPATCHER_THREADS by default; none at 0)."""
    templates = EmailTemplates(config.templates_dir, config.keys)
    client = connect(config)
    db = database(client, config)
    services = Services(
        config=config,
        store=InboxStore(db, config),
        outbox=Outbox(db, config.outbox_collection, retention_days=config.outbox_retention_days),
        templates=templates,
        idempotency=IdempotencyStore(db, config),
        preferences=PreferenceStore(db, config),
        clock=clock.now,
        events=metrics.DomainEvents(config.keys),
    )
    try:
        services.outbox.ensure_indexes()
        services.idempotency.ensure_indexes()
    except DatabaseUnavailable:
        # Start anyway and answer 503 until the database is back; dispatchers and the
        # idempotency store create their indexes again before their first claim.
        log.warning("database unavailable at start-up; indexes will be created later")
    runtime = Runtime(services=services, client=client, clock=clock)
    threads = config.dispatcher_threads if dispatcher_threads is None else dispatcher_threads
    if threads > 0:
        runtime.dispatchers = DispatcherPool.start(runtime.dispatch_context(), threads)
        # A process that exits through sys.exit (on SIGTERM/SIGINT) without closing it
        # still runs atexit: in-flight sends finish and their outcome is stored.
        atexit.register(runtime.close)
    return runtime
