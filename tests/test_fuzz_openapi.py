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
import signal
import subprocess
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from tests.redis_server import free_port
from tests.test_serve_uvicorn import softvq_command, wait_http_ready

EXAMPLES = 20  # per operation
SEEN: Counter = Counter()  # (method path, status) -> count, printed at the end of the module
CALL_TIMEOUT_S = 30  # a hang shows up as a timeout error, which fails the test


@pytest.fixture(scope="module")
def server(api_env, tmp_path_factory):
    port = free_port()
    # max_steps 4: fuzzed /generate requests that pass validation stay cheap
    env = {**os.environ, **api_env, "SOFTVQ_REQUEST_TIMEOUT_S": "20", "SOFTVQ_MAX_STEPS": "4"}
    log = open(tmp_path_factory.mktemp("fuzz") / "serve.log", "w+")
    proc = subprocess.Popen(
        [*softvq_command(), "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http_ready(base, proc)
        yield base, proc
    finally:
        print("fuzzed answers:", dict(sorted(SEEN.items())))
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.seek(0)
        print(log.read()[-3000:])
        log.close()


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
