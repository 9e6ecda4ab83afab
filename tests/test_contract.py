"""Contract tests: schemathesis against the service as production serves it, over HTTP.

`python -m notification_service serve` (which execs granian with the ASGI app) on a free
port, against the session's SecantusDB and a real SMTP server, with API keys and the
outbox dispatcher on. schemathesis sends every route requests made from the document,
valid and invalid (its examples, coverage and fuzzing phases), then scenarios that follow
the document's links. Every check it has must pass: no 5xx, and every answer as the
document says (status, content type, headers, body), valid input accepted and invalid
input refused.

Deterministic: Hypothesis derandomized (and so no example database, no .hypothesis
directory). The stateful scenarios pick among a link's values at random, as
schemathesis does (its own choice, outside Hypothesis).
"""

from __future__ import annotations

import contextlib
import itertools
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis
from bson import ObjectId
from conftest import MongoServer
from pymongo import MongoClient
from smtp_fixtures import SmtpServer

from notification_service.config import Config
from notification_service.embedded import start_service
from notification_service.notification_handler import api
from notification_service.openapi import document

KEY = "contract-test-key-" + "k" * 16
# The id the document's ObjectIdStr schemas carry as their example, which the examples
# phase sends: a user here, with an address, so that those requests get past the 404.
EXAMPLE_USER = "6756b2f1a4c3e0d9b8f71234"


@dataclass
class Service:
    base_url: str
    session: requests.Session = field(default_factory=requests.Session)  # one connection


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    server = SmtpServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def contract_db(mongo_admin: MongoClient[dict[str, Any]]) -> Iterator[str]:
    name = f"contract_{uuid.uuid4().hex[:12]}"
    mongo_admin[name].users.insert_one({"_id": ObjectId(EXAMPLE_USER), "email": "u@example.com"})
    yield name
    mongo_admin.drop_database(name)


@pytest.fixture(scope="module")
def service(
    mongo_server: MongoServer,
    contract_db: str,
    smtp: SmtpServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Service]:
    run_dir = tmp_path_factory.mktemp("contract")
    env = {
        "DB_URI": mongo_server.uri(contract_db),
        **smtp.env(),
        "WEB_WORKERS": "1",
        "API_KEYS": KEY,
        # POST /token mints tokens (without the secret it answers 501 tokens_not_configured).
        "USER_TOKEN_SECRET": "contract-" + "s" * 32,
        "EMAIL": "created@example.com",  # test mode: /create makes the users it does not know
        # The dispatcher sends for real (GET /email shows sent and failed emails too),
        # but slowly: the fan-outs queue thousands, whose sending would take the CPU
        # from the run.
        "SMTP_RATE_LIMIT": "2",
        "LOG_LEVEL": "WARNING",
        "TMPDIR": str(run_dir),  # serve's run directory, here rather than in /tmp
    }
    # serve execs granian: the process is the web server, SIGTERM its graceful stop.
    child, url = start_service(env, run_dir)
    served = Service(url)
    try:
        yield served
    finally:
        served.session.close()
        child.stop(timeout=45)


# schemathesis's own lists (5xx is not_a_server_error's to report), and 413: a body over
# MAX_BODY_BYTES is refused for its size in bytes, which no JSON schema of its fields can
# state (the request bodies' descriptions say it). A refusal, so a right answer to
# invalid data...
_REFUSED = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
# ...and to valid data only where the fields' own limits add up past 1 MiB: /email's
# text and html (768 Ki characters, up to 6 bytes each once JSON-escaped).
_ACCEPTED_OR_TOO_LARGE = ["2xx", "3xx", "401", "403", "404", "409", "413", "429"]

# Examples per operation of the fuzzing phase (the only phase they bound: the examples
# phase sends the document's own examples, the coverage phase every case it derives).
# `make faults` (and so CI) runs the full count; `make test` the quick one.
FULL_EXAMPLES = 100
QUICK_EXAMPLES = 25


def contract_config(examples: int) -> schemathesis.Config:
    """The run's settings, with up to `examples` fuzzed requests per operation."""
    return schemathesis.Config.from_dict(
        {
            "seed": 8,
            "generation": {"mode": "all", "max-examples": examples, "deterministic": True},
            "auth": {"openapi": {"apiKey": {"bearer": KEY}}},
            "checks": {"negative_data_rejection": {"expected-statuses": [*_REFUSED, "5xx"]}},
            # The document's links only: the inferred ones pick among a list's items, a
            # draw that depends on the server's state, which Hypothesis takes for a flaky
            # strategy.
            "phases": {"stateful": {"inference": {"algorithms": []}}},
            # One include-* key each: two in one entry would select either.
            "operations": [
                {
                    "include-name": "POST /email",
                    "checks": {
                        "positive_data_acceptance": {
                            "expected-statuses": [*_ACCEPTED_OR_TOO_LARGE, "5xx"]
                        }
                    },
                },
                # Routes without input but X-Request-ID: few examples tell all.
                *(
                    {"include-name": name, "generation": {"max-examples": min(25, examples)}}
                    for name in ("GET /health", "GET /ready", "GET /openapi.json", "GET /docs")
                ),
                # Three names, each answered with up to 1.5 MB.
                {"include-name": "GET /docs/{asset}", "generation": {"max-examples": 5}},
                # A stream that opens stays open until the client gives up: its refusals
                # are what generated requests find; a few openings tell the rest. Each
                # opening is read up to its first event, the `counts` the stream starts
                # with, and no further: nothing else comes (the next is a heartbeat
                # comment, 15 s on), so reading on only waited out the request timeout,
                # 10 s an opening.
                {
                    "include-name": "GET /stream",
                    "generation": {"max-examples": min(15, examples)},
                    "max-stream-events": 1,
                },
            ],
        }
    )


# The document the service serves (the first test checks it is this one). Generated here
# rather than fetched at collection, when the service is not yet running.
DOCUMENT = document(api.endpoints, Config())
schema = schemathesis.openapi.from_dict(DOCUMENT, config=contract_config(QUICK_EXAMPLES))
full_schema = schemathesis.openapi.from_dict(DOCUMENT, config=contract_config(FULL_EXAMPLES))

# What the service takes as an Idempotency-Key (idempotency.py's rule, the document's).
_VALID_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_fresh_keys = itertools.count()


def _as_a_client_would(case: schemathesis.Case) -> None:
    """A valid Idempotency-Key made unique, as a client's are ("use random ones").

    Generated keys repeat ("0" above all) with other bodies, which the service rightly
    refuses (422 idempotency_key_reused, as the IETF draft says); an invalid key stays
    as generated, so that its refusal is tested.
    """
    key = (case.headers or {}).get("Idempotency-Key")
    if key is not None and len(key) <= 255 and _VALID_KEY.fullmatch(key):
        case.headers["Idempotency-Key"] = f"contract-{next(_fresh_keys)}"


def test_the_service_serves_the_document_tested_here(service: Service) -> None:
    response = requests.get(f"{service.base_url}/openapi.json", timeout=10)
    assert response.status_code == 200
    assert response.json() == DOCUMENT


@schema.parametrize()
def test_every_answer_matches_the_document(case: schemathesis.Case, service: Service) -> None:
    """Every phase and check, with the quick count of fuzzed requests (`make test`)."""
    _as_a_client_would(case)
    case.call_and_validate(base_url=service.base_url, session=service.session)


@pytest.mark.faults
@full_schema.parametrize()
def test_every_answer_matches_the_document_in_full(
    case: schemathesis.Case, service: Service
) -> None:
    """The same with the full count (`make faults`, which CI runs)."""
    _as_a_client_would(case)
    case.call_and_validate(base_url=service.base_url, session=service.session)


def test_linked_calls_match_the_document(service: Service) -> None:
    """Scenarios along the links: create, then read, delete or list; email, then its state."""
    followed: list[str] = []

    class Scenarios(schema.as_state_machine()):
        def before_call(self, case: schemathesis.Case) -> None:
            _as_a_client_would(case)
            followed.append(case.operation.label)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": service.base_url, "session": service.session}

    settings = hypothesis.settings(
        max_examples=40,
        stateful_step_count=6,
        derandomize=True,
        deadline=None,
        phases=[hypothesis.Phase.generate],
        suppress_health_check=list(hypothesis.HealthCheck),
    )
    # A link's value exists in one scenario and not in the next (the server's state moved
    # on), so the same choices draw differently: Hypothesis's complaint, not the
    # service's, and schemathesis's own runner ends the scenarios there too. A check that
    # fails raises FailureGroup (or FlakyFailure), and still fails the test.
    with contextlib.suppress(hypothesis.errors.FlakyStrategyDefinition):
        Scenarios.run(settings=settings)
    # Enough ran, and along the links, for the scenarios to have tested something.
    assert len(followed) >= 100, len(followed)
    assert {"POST /read", "POST /delete", "GET /email/{email_id}"} <= set(followed)
