"""Plans and Engines called from many threads: every result equals the single-threaded one."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch

import fewstep as fs

from ..kernels.programs import VP

THREADS = 8
SOLVER = "dpmpp_2m_sde"  # stochastic: the seed matters too


class SlowNet:
    """A network that releases the GIL mid-call (real torch ops around a 1 ms sleep), so that threads
    interleave inside a plan's loop; records each call's (start, end, batch)."""

    def __init__(self, gate=None):
        self.calls, self.lock, self.gate = [], threading.Lock(), gate

    def __call__(self, x, t, class_labels):
        start = time.perf_counter()
        if self.gate is not None and x.shape[0] == self.gate[0]:
            self.gate[1].set()  # entered
            assert self.gate[2].wait(60), "the test never released the gate"
        s = (class_labels.to(x.dtype).view(-1, *[1] * (x.dim() - 1)) + 1) / 10
        y = torch.tanh(x) * s + 1e-4 * t.view(-1, *[1] * (x.dim() - 1))
        time.sleep(0.001)
        y = 0.9 * y + 0.1 * torch.sin(x)
        with self.lock:
            self.calls.append((start, time.perf_counter(), x.shape[0]))
        return y


def _jobs(n, batches):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        b = batches[i % len(batches)]
        out.append((torch.randn(b, 2, 4, 4, generator=g), torch.randint(0, 10, (b,), generator=g), 1000 + i))
    return out


def _run_threaded(call, jobs):
    """Run ``call(job)`` for every job on THREADS threads, all released at once; results in job order."""
    start = threading.Barrier(THREADS)

    def worker(k):
        start.wait()
        return [(i, call(jobs[i])) for i in range(k, len(jobs), THREADS)]

    with ThreadPoolExecutor(THREADS) as pool:
        parts = list(pool.map(worker, range(THREADS)))
    results = dict(r for part in parts for r in part)
    return [results[i] for i in range(len(jobs))]


def test_plan_from_8_threads_equals_single_threaded():
    jobs = _jobs(48, [3])
    plan = fs.compile(SlowNet(), VP, solver=SOLVER, nfe=4, shape=(3, 2, 4, 4), device="cpu",
                      cond={"class_labels": jobs[0][1]})

    def call(job):
        noise, labels, seed = job
        return plan(noise, seed=seed, class_labels=labels)

    want = [call(j) for j in jobs]
    assert len({tuple(w.flatten()[:4].tolist()) for w in want}) == len(jobs)  # inputs really differ
    got = _run_threaded(call, jobs)
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(jobs)} threaded results differ from the single-threaded ones"


def test_engine_two_shapes_from_8_threads():
    net = SlowNet()
    eng = fs.Engine(net, VP, solver=SOLVER, nfe=4)
    jobs = _jobs(64, [2, 3])

    def call(job):
        noise, labels, seed = job
        return eng(noise, seed=seed, class_labels=labels)

    want = [call(j) for j in jobs]
    assert len(eng.plans) == 2
    net.calls.clear()
    got = _run_threaded(call, jobs)
    bad = [i for i, (a, b) in enumerate(zip(got, want)) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(jobs)} threaded results differ from the single-threaded ones"
    # the two shapes ran at the same time: some network call of batch 2 overlaps one of batch 3
    by = {b: [(s, e) for s, e, bb in net.calls if bb == b] for b in (2, 3)}
    assert any(s2 < e3 and s3 < e2 for s2, e2 in by[2] for s3, e3 in by[3])
    # and one shape's calls never overlapped each other (one replay at a time per plan)
    for calls in by.values():
        calls.sort()
        assert all(e1 <= s2 for (_, e1), (s2, _) in zip(calls, calls[1:]))


def test_engine_builds_a_new_shape_once():
    net = SlowNet()
    eng = fs.Engine(net, VP, solver="euler", nfe=3)
    noise, labels = torch.randn(5, 2, 4, 4), torch.arange(5)
    start = threading.Barrier(THREADS)

    def worker(_):
        start.wait()
        return eng.plan_for(noise, class_labels=labels)

    with ThreadPoolExecutor(THREADS) as pool:
        plans = list(pool.map(worker, range(THREADS)))
    assert all(p is plans[0] for p in plans) and len(eng.plans) == 1
    assert len(net.calls) == 3  # one warm-up of 3 network calls: one build


def test_a_build_does_not_block_other_shapes():
    entered, release = threading.Event(), threading.Event()
    net = SlowNet(gate=(5, entered, release))
    eng = fs.Engine(net, VP, solver="euler", nfe=2)
    small = (torch.randn(2, 2, 4, 4), torch.arange(2))
    want = eng(small[0], class_labels=small[1])
    big = (torch.randn(5, 2, 4, 4), torch.arange(5))
    builder = threading.Thread(target=lambda: eng(big[0], class_labels=big[1]))
    builder.start()
    try:
        assert entered.wait(60)  # shape 5 is being built, blocked inside its warm-up
        done = []
        other = threading.Thread(target=lambda: done.append(eng(small[0], class_labels=small[1])))
        other.start()
        other.join(30)
        assert done and torch.equal(done[0], want), "a call on a built shape waited for another shape's build"
        assert len(eng.plans) == 1
    finally:
        release.set()
        builder.join(60)
    assert len(eng.plans) == 2
