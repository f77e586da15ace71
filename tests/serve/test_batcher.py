"""Dynamic batching without HTTP: merging, grouping by row shape, max batch, failures."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from modrt.serve.batcher import BatchConfig, Batcher, BatcherClosedError


def run_jobs(xs, config: BatchConfig, fn=None):
    calls: list[tuple] = []

    def run(feeds, want, context=None):
        x = feeds["x"]
        calls.append(x.shape)
        if fn:
            return fn(x)
        return {"y": x * 2, "s": x.sum(axis=tuple(range(1, x.ndim)))}

    async def main():
        b = Batcher(run, config)
        await b.start()
        try:
            return await asyncio.gather(*(b.submit({"x": x}) for x in xs), return_exceptions=True)
        finally:
            await b.stop()

    return asyncio.run(main()), calls


def test_concurrent_jobs_merge_into_one_run():
    xs = [np.full((1, 3), i, np.float32) for i in range(8)]
    results, calls = run_jobs(xs, BatchConfig(max_batch=32, max_queue_delay_us=50_000))
    assert calls == [(8, 3)]
    for x, r in zip(xs, results, strict=True):
        np.testing.assert_array_equal(r.outputs["y"], x * 2)
        assert r.timing.batch_size == 8 and r.timing.queue_ns > 0


def test_rows_of_different_shape_never_share_a_run():
    xs = [np.ones((1, 3)), np.ones((2, 5)), np.ones((1, 3)), np.ones((1, 5))]
    results, calls = run_jobs(xs, BatchConfig(max_batch=32, max_queue_delay_us=50_000))
    assert sorted(calls) == [(2, 3), (3, 5)]
    assert [r.outputs["y"].shape for r in results] == [x.shape for x in xs]


def test_max_batch_caps_rows_per_run():
    xs = [np.ones((2, 4)) for _ in range(5)]
    _, calls = run_jobs(xs, BatchConfig(max_batch=4, max_queue_delay_us=50_000))
    assert all(c[0] <= 4 for c in calls) and sum(c[0] for c in calls) == 10


def test_max_batch_one_runs_each_job_alone():
    xs = [np.ones((1, 2)) for _ in range(4)]
    _, calls = run_jobs(xs, BatchConfig(max_batch=1, max_queue_delay_us=0))
    assert calls == [(1, 2)] * 4


def test_a_failing_run_fails_its_jobs_and_the_batcher_goes_on():
    def boom(x):
        if x[0, 0] < 0:
            raise RuntimeError("boom")
        return {"y": x}

    xs = [np.full((1, 1), -1.0), np.full((1, 2), 1.0)]
    results, _ = run_jobs(xs, BatchConfig(max_batch=8, max_queue_delay_us=50_000), boom)
    assert isinstance(results[0], RuntimeError)
    np.testing.assert_array_equal(results[1].outputs["y"], xs[1])


@pytest.mark.parametrize("kw", [{"max_batch": 0}, {"max_queue_delay_us": -1}])
def test_config_is_validated(kw):
    with pytest.raises(ValueError):
        BatchConfig(**kw)


def test_submit_after_stop_is_refused_and_pending_jobs_finish():
    async def main():
        b = Batcher(lambda f, w, c: {"y": f["x"]}, BatchConfig(max_batch=64, max_queue_delay_us=10_000_000))
        await b.start()
        pending = [asyncio.ensure_future(b.submit({"x": np.ones((1, 2))})) for _ in range(3)]
        await asyncio.sleep(0)  # queued, waiting for company (a 10 s delay)
        await b.stop()  # does not wait for the delay: drains at once
        assert all(p.done() and p.result().outputs["y"].shape == (1, 2) for p in pending)
        with pytest.raises(BatcherClosedError):
            await b.submit({"x": np.ones((1, 2))})

    asyncio.run(main())


def test_a_batch_leaves_when_full_without_waiting_for_the_delay():
    async def main():
        b = Batcher(lambda f, w, c: {"y": f["x"]}, BatchConfig(max_batch=4, max_queue_delay_us=10_000_000))
        await b.start()
        try:
            return await asyncio.wait_for(asyncio.gather(*(b.submit({"x": np.ones((1, 2))}) for _ in range(4))), 5)
        finally:
            await b.stop()

    assert [r.timing.batch_size for r in asyncio.run(main())] == [4] * 4


def test_max_cost_caps_the_work_of_a_run_and_a_larger_job_runs_alone():
    seen: list[int] = []

    async def main():
        b = Batcher(lambda f, w, c: seen.append(f["x"].shape[0]) or {"y": f["x"]},
                    BatchConfig(max_batch=64, max_queue_delay_us=50_000, max_cost=100))
        await b.start()
        try:
            jobs = [b.submit({"x": np.ones((1, 2))}, cost=40) for _ in range(5)] + \
                [b.submit({"x": np.ones((1, 2))}, cost=250)]
            return await asyncio.gather(*jobs)
        finally:
            await b.stop()

    asyncio.run(main())
    assert sorted(seen) == [1, 1, 2, 2]  # 40+40 | 40+40 | 40 | 250 alone


def test_a_run_computes_the_union_of_what_its_jobs_want_and_keys_by_input_names():
    calls: list[tuple] = []

    def run(feeds, want, context=None):
        calls.append((tuple(feeds), want, feeds["x"].shape[0]))
        return {"y": feeds["x"], "z": feeds["x"]}

    async def main():
        b = Batcher(run, BatchConfig(max_batch=64, max_queue_delay_us=50_000))
        await b.start()
        try:
            return await asyncio.gather(
                b.submit({"x": np.ones((1, 2))}, frozenset({"y"})), b.submit({"x": np.ones((2, 2))}, frozenset({"z"})),
                b.submit({"x": np.ones((1, 2)), "h": np.ones((1, 3))}, frozenset({"y"})))
        finally:
            await b.stop()

    results = asyncio.run(main())
    assert sorted(calls, key=len) == sorted([(("x",), frozenset({"y", "z"}), 3), (("x", "h"), frozenset({"y"}), 1)],
                                            key=len)
    assert [r.outputs["y"].shape[0] for r in results] == [1, 2, 1]
