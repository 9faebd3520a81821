"""Merging requests into plan calls (fewstep.serve.batching) on the bundled digits model, without a server.

The oracle of every request is a plan compiled by ``fs.compile`` for that request alone (its own batch size,
its own seed).  Deterministic solvers: a merged request equals it within 1e-5 relative (max |difference| over
max |sample|); measured on this 2-core CPU (fp32, one thread, 8 random requests of 1..8 rows placed in
batches of 1..16 rows at both ends) the worst was 1.6e-6 (unipc, dpmpp_2m, ddim, NFE 8): float32 matrix
products of a different batch size round differently, the network itself treats every row on its own.
Stochastic solvers: each request runs alone, and equals its oracle exactly.
"""

import io

import numpy as np
import pytest
import torch

import fewstep as fs
from fewstep.serve import ServeOptions
from fewstep.serve.batching import Job, bucket_for, bucket_sizes, pack, run_jobs
from fewstep.serve.models import EngineCache, load_served_model
from fewstep.serve.protocol import SampleRequest, request_noise

REL_TOL = 1e-5
NFE = 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the digits network is tiny: on a shared 2-core machine two OpenMP threads are many times slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def served():
    return load_served_model(ServeOptions())


@pytest.fixture(scope="module")
def engines(served):
    return EngineCache(served, ServeOptions(max_batch=8, max_engines=4))


def job(engine, labels, seed, solver="unipc", guidance=1.5) -> Job:
    req = SampleRequest(tuple(labels), seed, solver, NFE, guidance, "npy")
    return Job(req, engine, request_noise(len(labels), (1, 8, 8), seed), torch.tensor(labels))


def alone(served, j: Job) -> torch.Tensor:
    """The oracle: a plan for this request alone, compiled directly."""
    r = j.request
    plan = fs.compile(served.model, served.spec, solver=r.solver, nfe=r.nfe, guidance_scale=r.guidance_scale,
                      shape=tuple(j.noise.shape), cond={"class_labels": j.labels})
    return plan(j.noise, seed=r.seed, class_labels=j.labels)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def test_pack_first_fit_decreasing():
    rows = [1, 3, 2, 2, 5, 1, 8, 4, 4]
    bins = pack(range(len(rows)), rows, 8)
    assert bins == [[6], [4, 1], [7, 8], [2, 3, 0, 5]]
    assert pack([], rows, 8) == []
    assert pack([0, 5], rows, 1) == [[0], [5]]


def test_buckets():
    assert bucket_sizes(1) == (1,)
    assert bucket_sizes(8) == (1, 2, 4, 8)
    assert bucket_sizes(6) == (1, 2, 4, 6)
    assert [bucket_for(n, bucket_sizes(8)) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="max_batch"):
        bucket_sizes(0)
    with pytest.raises(ValueError, match="9 rows exceed the largest bucket 8"):
        bucket_for(9, bucket_sizes(8))


def test_merged_requests_equal_their_own_plans(served, engines):
    eng = engines.get("unipc", NFE, 1.5)
    rows = [1, 3, 2, 2, 5, 1]
    gen = torch.Generator().manual_seed(0)
    jobs = [job(eng, torch.randint(0, 10, (n,), generator=gen).tolist(), seed=100 + i)
            for i, n in enumerate(rows)]
    out = run_jobs(jobs, max_batch=8)
    # first-fit decreasing: 5+3 = 8 rows in one call, 2+2+1+1 = 6 rows padded to the 8 bucket in another
    assert [(r.batch_rows, r.batch_requests) for r in out] == [(8, 4), (8, 2), (8, 4), (8, 4), (8, 2), (8, 4)]
    for j, r in zip(jobs, out):
        want = alone(served, j)
        assert r.samples.shape == want.shape and torch.isfinite(r.samples).all()
        assert rel_err(r.samples, want) <= REL_TOL


def test_stochastic_requests_run_alone_and_reproduce_exactly(served, engines):
    eng = engines.get("dpmpp_2m_sde", NFE, 1.5)
    assert eng.program.stochastic
    jobs = [job(eng, [3, 1], 7, solver="dpmpp_2m_sde"), job(eng, [4, 4, 9], 8, solver="dpmpp_2m_sde")]
    out = run_jobs(jobs, max_batch=8)
    assert [(r.batch_rows, r.batch_requests) for r in out] == [(2, 1), (3, 1)]
    for j, r in zip(jobs, out):
        assert torch.equal(r.samples, alone(served, j))


def test_programs_never_share_a_call(served, engines):
    a, b = engines.get("unipc", NFE, 1.5), engines.get("ddim", NFE, None)
    jobs = [job(a, [1], 1), job(b, [2, 3], 2, solver="ddim", guidance=None), job(a, [4, 5], 3),
            job(b, [6], 4, solver="ddim", guidance=None)]
    out = run_jobs(jobs, max_batch=8)
    assert [(r.batch_rows, r.batch_requests) for r in out] == [(4, 2), (4, 2), (4, 2), (4, 2)]
    for j, r in zip(jobs, out):
        assert rel_err(r.samples, alone(served, j)) <= REL_TOL


class _Failing:
    class program:
        stochastic = False

    def __call__(self, *a, **k):
        raise RuntimeError("plan call failed")


def test_a_failing_call_fails_only_its_jobs(served, engines):
    good = engines.get("unipc", NFE, 1.5)
    jobs = [job(_Failing(), [1], 1), job(good, [2], 2)]
    jobs.append(job(jobs[0].engine, [3], 3))
    out = run_jobs(jobs, max_batch=8)
    assert isinstance(out[0], RuntimeError) and out[2] is out[0]
    assert rel_err(out[1].samples, alone(served, jobs[1])) <= REL_TOL
    with pytest.raises(ValueError, match="a job of 9 rows exceeds max_batch 8"):
        run_jobs([job(good, [1] * 9, 1)], max_batch=8)


def test_engine_cache_is_bounded_and_warm_builds_every_bucket(served):
    cache = EngineCache(served, ServeOptions(max_batch=4, max_engines=2))
    first = cache.get("unipc", 2, None)
    assert cache.get("unipc", 2, None) is first
    cache.get("ddim", 2, None)
    cache.get("euler", 2, None)  # a third program drops the least recently used one
    assert cache.get("unipc", 2, None) is not first
    with pytest.raises(ValueError):  # a program the solver cannot build is the caller's error (a 400)
        cache.get("unipc", 1001, None)
    cache.warm("ddim", 2, None)
    assert sorted(p.shape[0] for p in cache.get("ddim", 2, None).plans) == [1, 2, 4]


def test_png_is_the_samples_drawn(served):
    from PIL import Image

    x = torch.linspace(-1, 1, 2 * 64).reshape(2, 1, 8, 8)
    img = np.asarray(Image.open(io.BytesIO(served.png(x))))
    assert img.dtype == np.uint8 and img.shape == (8 * 4 + 2, 2 * (8 * 4 + 1) + 1)  # 4x, 1-pixel borders
    tile = img[1:33, 1:33][::4, ::4]  # the first sample, one pixel per value
    want = np.clip((x[0, 0].numpy() + 1) / 2 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(tile, want)


def test_a_local_diffusers_dit_is_served_like_fewstep_sample_loads_it(tmp_path):
    from ..cli.test_cli import _tiny_dit_pipeline, _tiny_unet_dir

    _tiny_dit_pipeline(tmp_path / "pipe")
    options = ServeOptions(model="pipe", diffusers=str(tmp_path / "pipe"), max_batch=4, nfe=3, solver="ddim")
    served = load_served_model(options)
    assert (served.sample_shape, served.num_classes, served.can_png) == ((4, 8, 8), 10, True)
    engine = EngineCache(served, options).get("ddim", 3, 1.5)
    jobs = [Job(SampleRequest((1, 7), 5, "ddim", 3, 1.5, "npy"), engine, request_noise(2, (4, 8, 8), 5),
                torch.tensor([1, 7])),
            Job(SampleRequest((2,), 6, "ddim", 3, 1.5, "npy"), engine, request_noise(1, (4, 8, 8), 6),
                torch.tensor([2]))]
    out = run_jobs(jobs, max_batch=4)
    for j, r in zip(jobs, out):
        plan = fs.compile(served.model, served.spec, solver="ddim", nfe=3, guidance_scale=1.5,
                          shape=tuple(j.noise.shape), cond={"class_labels": j.labels})
        assert rel_err(r.samples, plan(j.noise, class_labels=j.labels)) <= REL_TOL
    from PIL import Image

    assert Image.open(io.BytesIO(served.png(out[0].samples))).size == (2 * 8, 8)  # decoded by the VAE
    unet, sched = _tiny_unet_dir(tmp_path / "u")
    with pytest.raises(ValueError, match="UNet2DConditionModel is not served"):
        load_served_model(ServeOptions(model="u", diffusers=str(unet), scheduler_config=str(sched)))


def test_runner_merges_what_waits_into_the_next_run():
    """While one run is under way, later batches join the next run (the oldest, then whatever fits the
    capacity in rows); a cancelled submit is dropped unrun; an exception reaches every request of its run."""
    import asyncio
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from fewstep.serve.batching import PlanRunner

    gate, runs = threading.Event(), []

    def run(jobs):
        runs.append([j.request.seed for j in jobs])
        if len(runs) == 1:
            gate.wait(10)  # the first run holds the worker until every other batch has been submitted
        if any(j.request.seed == 99 for j in jobs):
            raise RuntimeError("boom")
        return [f"r{j.request.seed}" for j in jobs]

    def jobs(*seeds, rows=1):
        return [Job(SampleRequest((0,) * rows, s, "unipc", 4, None, "npy"), None,
                    torch.zeros(rows, 1, 8, 8), torch.zeros(rows, dtype=torch.long)) for s in seeds]

    async def scenario():
        runner = PlanRunner(run, capacity=3, executor=ThreadPoolExecutor(1))
        first = asyncio.ensure_future(runner.submit(jobs(1)))
        await asyncio.sleep(0.05)  # run 1 has started
        b = asyncio.ensure_future(runner.submit(jobs(2, 3)))
        d = asyncio.ensure_future(runner.submit(jobs(6, rows=2)))  # 2 + 2 rows exceed 3: waits for run 3
        c = asyncio.ensure_future(runner.submit(jobs(4)))  # fits beside b: joins run 2, ahead of d
        cancelled = asyncio.ensure_future(runner.submit(jobs(5)))
        e = asyncio.ensure_future(runner.submit(jobs(99)))
        await asyncio.sleep(0.05)
        cancelled.cancel()
        gate.set()
        assert await first == ["r1"]
        assert await b == ["r2", "r3"] and await c == ["r4"]
        for late in (d, e):  # run 3 holds both; its failure is theirs
            with pytest.raises(RuntimeError, match="boom"):
                await late
        return runner.runs

    assert asyncio.run(scenario()) == 3
    assert runs == [[1], [2, 3, 4], [6, 99]]
