# ruff: noqa: F811 (the fixtures imported from test_api are arguments of the tests by name)
"""Schemathesis over the app's own OpenAPI document, with a real API key, on SQLite and PostgreSQL.

- Every operation, with inputs that fit its schema (positive) and inputs that break it (negative).
- Stateful: scenarios that follow the document's links (create a job -> get it, its events, its
  artifacts, cancel it; create an upload -> get it, delete it). Each scenario has an owner of its own.

Checks on every response: never a 5xx; the status code, content type, headers and body are ones the
document declares. Values that break APIs (NUL, numbers past 32 and 64 bits, long strings) are mixed
into the generated ones. Hypothesis runs derandomized (the same cases on every run) and small; each test
prints how many cases it ran (`pytest -s`). At the time of writing, per database: 482 operation cases
(15 per operation and mode; 18 operations, the 2 probes without parameters have no negative cases) and
36 stateful scenarios making 155 calls; the four tests take 20-30 s on 2 cores.
A deeper run (FUZZ_EXAMPLES=100 FUZZ_SCENARIOS=150 FUZZ_RANDOM=1) finds nothing either; on the code
before this hardening, such a run found `?after=` past the 32-bit `seq` column (a 500 on PostgreSQL)
by following the links.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from store import db, repo
from tests.test_api import Api, make_api  # noqa: F401 (fixture)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
# Sizes for CI; a deeper run: FUZZ_EXAMPLES=300 FUZZ_SCENARIOS=300 FUZZ_RANDOM=1 pytest -s tests/test_fuzz.py
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 15))  # per operation and generation mode
SCENARIOS, STEPS = int(os.environ.get("FUZZ_SCENARIOS", 20)), 6
RANDOM = bool(os.environ.get("FUZZ_RANDOM"))  # new cases each run, rather than the same ones
# Values that have broken APIs like this one, mixed into what Schemathesis generates: characters the
# database refuses, numbers beyond its integer columns, strings past every length.
HOSTILE = {
    "dictionaries": {
        "hostile-strings": {
            "values": ["\x00", "a\x00b", "x" * 300, "upload:\x00", "%00", "\u202e", "\u00b2"]
        },
        "hostile-integers": {"values": [2**31 - 1, 2**31, 2**63, 10**20, -1, -(2**63) - 1]},
        "hostile-numbers": {"values": [1e308, -1e308, 5e-324]},
    },
    "generation": {
        "dictionaries": {
            "string": {"dictionary": "hostile-strings", "probability": 0.2},
            "integer": {"dictionary": "hostile-integers", "probability": 0.2},
            "number": {"dictionary": "hostile-numbers", "probability": 0.1},
        }
    },
    # the links the document declares, none guessed from responses (stateful runs stay reproducible)
    "phases": {"stateful": {"inference": {"algorithms": []}}},
}


def _settings(examples: int, **kw: Any) -> hypothesis.settings:
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not RANDOM,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
        **kw,
    )


@pytest.fixture(params=["sqlite", "pg"])
def served(make_api, request: pytest.FixtureRequest) -> tuple[Api, Any]:
    """The app on one database, a key for it, and its schema as Schemathesis loads it."""
    api = make_api(
        request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"),
        max_upload_bytes=64 * 1024,
        rate_per_s=0,  # no rate limit or queue quota: 429s would stop the fuzz short of the routes
        quota_queued_jobs=0,
    )
    config = schemathesis.Config.from_dict(HOSTILE)
    schema = schemathesis.openapi.from_asgi("/openapi.json", api.client.app, config=config)
    return api, schema


def _fuzz(api: Api, operation: Any, mode: GenerationMode, ran: Counter[str]) -> None:
    @_settings(EXAMPLES)
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        ran[operation.label] += 1
        case.call_and_validate(headers=api.a, checks=CHECKS)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:  # nothing to make invalid (no parameters)
        assert mode is GenerationMode.NEGATIVE


def test_fuzz_every_operation(served: tuple[Api, Any]) -> None:
    api, schema = served
    ran: Counter[str] = Counter()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz(api, operation, mode, ran)
    print(f"\nfuzz: {sum(ran.values())} cases over {len(ran)} operations: {dict(ran)}")
    assert len(ran) == len(operations) >= 18


def test_fuzz_stateful_links(served: tuple[Api, Any]) -> None:
    api, schema = served
    steps: Counter[str] = Counter()
    scenarios = 0

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            """A new owner per scenario: no scenario sees another's jobs (Hypothesis replays must)."""
            nonlocal scenarios
            scenarios += 1
            with db.session_scope(api.engine) as s:
                _, key = repo.create_api_key(s, f"fuzz-{scenarios}")
            self.auth = {"Authorization": f"Bearer {key}"}

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": self.auth}

        def after_call(self, response: Any, case: schemathesis.Case) -> None:
            steps[f"{case.operation.label} -> {response.status_code}"] += 1

        def validate_response(self, response: Any, case: schemathesis.Case, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs or None)

    Machine.run(settings=_settings(SCENARIOS, stateful_step_count=STEPS))
    print(f"\nstateful: {scenarios} scenarios, {sum(steps.values())} calls: {dict(steps)}")
    # the links were followed: calls on jobs that exist, not only 404s on invented ids
    followed = [k for k in steps if k.split(" -> ")[1] in ("200", "202") and "{job_id}" in k]
    assert followed, steps
