"""Property-based fuzzing of the HTTP API from its own OpenAPI schema (schemathesis):
whatever the generated request, valid or not, the API answers without a server
error. Runs in process (ASGI) against a real redis-server and a SQLite store;
no workers are needed, since nothing here waits for a prediction."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from core.config import Settings

KEY = "schema-test-key"


@pytest.fixture(scope="module")
def api_app(new_broker, tmp_path_factory):
    from producer.api import create_app

    db = tmp_path_factory.mktemp("api-schema") / "mmq.db"
    s = Settings(broker_url=new_broker(), database_url=f"sqlite:///{db}",
                 api_keys=KEY, max_queue_depth=50, max_wait_s=0.2,
                 max_request_bytes=256 * 1024, max_payload_bytes=128 * 1024,
                 search_query_timeout_s=0.2)  # no worker embeds a search query here
    app = create_app(s)
    yield app
    app.state.client.close()


@pytest.fixture(scope="module")
def api_schema(api_app):
    return schemathesis.openapi.from_asgi("/openapi.json", api_app)


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except the 503 that POST /v1/search answers by design
    here: no worker runs to embed its query; nor the 504 of the OpenAI routes, which
    wait for their jobs (MMQ_MAX_WAIT_S) and say when none finished."""
    if (case.path == "/v1/search" and response.status_code == 503
            and response.json()["error"]["code"] == "unavailable"):
        return None
    if (case.path in ("/v1/embeddings", "/v1/audio/transcriptions")
            and response.status_code == 504 and response.json()["error"]["code"] == "timeout"):
        return None
    return not_a_server_error(ctx, response, case)


def _fuzz(schema, headers: dict, max_examples: int) -> list[str]:
    """Every operation, ``max_examples`` generated requests each; the failures.
    (A plain loop over operations: schemathesis' lazy pytest fixture loader does
    not work with pytest 9.)"""
    failures = []
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=max_examples, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def run(case):
            case.call_and_validate(headers=headers, checks=[no_server_error])

        try:
            run()
        except Exception as e:  # report every operation's failure, not just the first
            failures.append(f"{op.method.upper()} {op.path}: {e}")
    return failures


def test_no_server_error(api_schema):
    # With the key, so the fuzzing reaches the handlers rather than stopping at 401.
    failures = _fuzz(api_schema, {"Authorization": f"Bearer {KEY}"}, max_examples=40)
    assert not failures, "\n\n".join(failures)


def test_no_server_error_without_key(api_schema):
    failures = _fuzz(api_schema, {}, max_examples=5)
    assert not failures, "\n\n".join(failures)
