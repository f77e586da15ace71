"""Property-based fuzzing of the HTTP API from its own OpenAPI document (schemathesis).

A real uvicorn server on a free loopback port; every operation of ``/openapi.json`` gets
generated requests (valid and invalid), bounded to about 500 cases in all. Whatever a
client sends, the server must never answer 5xx. Slow: ``pytest -m slow``.
"""

from __future__ import annotations

from collections import Counter

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402 - after the importorskip

from modrt.serve.batcher import BatchConfig  # noqa: E402
from modrt.serve.dataplane import DataPlane  # noqa: E402

from .conftest import ServerThread  # noqa: E402

CASES_PER_OPERATION = 30  # hypothesis stops early where the input space is small (no parameters)
CASES_PER_INFER = 175  # the infer operations (JSON / binary bodies) get most of the ~500 cases
STATUSES: Counter = Counter()


@pytest.fixture(scope="module")
def fuzz_server(lm_model):
    with ServerThread(DataPlane(lm_model, "lm", BatchConfig(max_batch=8, max_queue_delay_us=500))) as s:
        yield s


def strategy_of(operation):
    """Valid and invalid (negative) requests for one operation; where the path names a
    model, mostly the served one (``lm``, version ``1``), so requests reach the data plane."""
    from hypothesis import strategies as st

    pos, neg = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    random = [operation.as_strategy(generation_mode=m) for m in (pos, neg)]
    if "{name}" not in operation.path:
        return st.one_of(*random)
    ours = {"name": "lm", **({"version": "1"} if "{version}" in operation.path else {})}
    served = [operation.as_strategy(generation_mode=m, path_parameters=ours) for m in (pos, neg)]
    return st.one_of(*served, *served, *random)


@pytest.mark.slow
def test_no_server_errors(fuzz_server):
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/openapi.json")
    failures: list[str] = []
    operations = [r.ok() for r in schema.get_all_operations()]
    assert len(operations) >= 12

    for op in operations:
        n = CASES_PER_INFER if op.path.endswith("/infer") else CASES_PER_OPERATION

        @settings(max_examples=n, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        @given(case=strategy_of(op))
        def fuzz(case):
            response = case.call(base_url=fuzz_server.url, timeout=20)
            STATUSES[response.status_code] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.formatted_path} {case.body!r:.200} -> "
                                f"{response.status_code}: {response.text[:300]}")

        before = sum(STATUSES.values())
        fuzz()
        print(f"  {op.method.upper()} {op.path}: {sum(STATUSES.values()) - before} cases")
    total = sum(STATUSES.values())
    print(f"\nschemathesis: {len(operations)} operations, {total} cases, statuses {dict(sorted(STATUSES.items()))}")
    assert total >= 300
    assert not failures, "\n".join(failures[:10])


@pytest.mark.slow
def test_server_still_answers_after_fuzzing(fuzz_server):
    import httpx

    r = httpx.post(f"{fuzz_server.url}/v2/models/lm/infer", timeout=20,
                   json={"inputs": [{"name": "tokens", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]})
    assert r.status_code == 200, r.text
