"""Schemathesis fuzzes every operation of the OpenAPI schema against ``softvq serve`` (a real
process under uvicorn, embedded broker, tiny models): no answer is a 5xx (except the 504 of a
request that set its own impossible ``timeout_s``), every refusal is the
``{"error", "message"}`` JSON, and nothing hangs (a client timeout fails the test).

Schemathesis generates both conforming requests (which run the model) and schema-violating
ones (wrong types, missing fields, odd content types). The example budget keeps the module
well under a minute on two shared cores.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.test_serve_uvicorn import serve_process

EXAMPLES = 20  # per operation
SEEN: Counter = Counter()  # (method path, status) -> count, printed at the end of the module
CALL_TIMEOUT_S = 30  # a hang shows up as a timeout error, which fails the test


@pytest.fixture(scope="module")
def server(api_env, tmp_path_factory):
    # max_steps 4: fuzzed /generate requests that pass validation stay cheap
    env = {**os.environ, **api_env, "SOFTVQ_REQUEST_TIMEOUT_S": "20", "SOFTVQ_MAX_STEPS": "4"}
    with serve_process(env, tmp_path_factory.mktemp("fuzz")) as (base, proc):
        try:
            yield base, proc
        finally:
            print("fuzzed answers:", dict(sorted(SEEN.items())))


@pytest.fixture(scope="module")
def api_schema(server):
    import httpx

    base, _ = server
    return schemathesis.openapi.from_dict(httpx.get(f"{base}/openapi.json").json())


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same cases every CI run
)
def test_no_5xx_and_every_error_is_json(case, server):
    base, proc = server
    response = case.call(base_url=base, timeout=CALL_TIMEOUT_S)
    SEEN[(f"{case.method} {case.path}", response.status_code)] += 1
    what = (case.path, response.status_code, response.text[:300])
    if response.status_code == 504:
        # Only a deadline the caller chose itself may pass (``timeout_s``, e.g. 1e-300 s).
        assert isinstance(case.body, dict) and case.body.get("timeout_s") is not None, what
        assert response.json()["error"] == "timeout", what
    else:
        assert response.status_code < 500, what
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error", "message"}, body
        assert isinstance(body["error"], str) and body["message"]
    assert proc.poll() is None  # the server is still up
