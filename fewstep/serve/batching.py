"""Merging concurrent requests into the Engine's batch buckets, and splitting the result.  No Ray here.

A replica's ``@serve.batch`` handler gets a list of :class:`Job` (requests already checked, each with its
noise and its program's Engine) and hands it to :func:`run_jobs` on a worker thread:

* jobs are grouped by Engine (one Engine per (solver, nfe, guidance)), in arrival order;
* deterministic programs: the jobs of a group are packed (first-fit decreasing) into plan calls of at most
  ``max_batch`` rows, each padded to the next bucket (:func:`bucket_sizes`: powers of two up to
  ``max_batch``, so a replica builds few plans), each run as one Engine call and split back.  The network
  treats every row on its own (the guided batch is ``[uncond; cond]`` row by row), so a request's samples do
  not depend on the other rows: they equal the samples of a plan of the request's own size up to float32
  rounding of batched matrix products (measured in tests/serve/test_batching.py);
* stochastic programs (noise drawn inside the plan, keyed by one seed for the whole batch): each job runs
  alone, in a plan of exactly its own size with its own seed, so its samples are those of
  ``fs.compile(..., shape=(len(labels), *sample_shape))(noise, seed=seed, ...)``; merging would tie a
  request's noise to the other requests of its batch.

A failing plan call fails only the jobs in it: the others of the batch still get their samples.

:class:`PlanRunner` sits between ``@serve.batch`` and the worker thread: every batch that arrives while a run
is under way joins the next run, so a busy replica's backlog fills its plan calls (see its docstring).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

import torch

from .protocol import SampleRequest

__all__ = ["Job", "JobResult", "PlanRunner", "bucket_sizes", "bucket_for", "job_rows", "pack", "run_jobs"]


@dataclass
class Job:
    """One checked request: its noise ``(n, *sample_shape)`` float32 and labels ``(n,)`` int64 (CPU), and
    the Engine of its program."""

    request: SampleRequest
    engine: Any
    noise: torch.Tensor
    labels: torch.Tensor

    @property
    def rows(self) -> int:
        return self.noise.shape[0]


@dataclass(frozen=True)
class JobResult:
    """A job's samples (CPU float32) and the plan call it ran in: its rows (the bucket, padding included)
    and how many requests shared it."""

    samples: torch.Tensor
    batch_rows: int
    batch_requests: int


def bucket_sizes(max_batch: int) -> tuple[int, ...]:
    """Plan batch sizes a replica uses: 1, 2, 4, ... below ``max_batch``, and ``max_batch``."""
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch: expected an int >= 1, got {max_batch!r}")
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def bucket_for(rows: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``rows``."""
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows exceed the largest bucket {buckets[-1]}")


def job_rows(jobs: Sequence[Job]) -> int:
    """Rows of a list of jobs (``@serve.batch``'s ``batch_size_fn``: a batch holds at most max_batch rows)."""
    return sum(j.rows for j in jobs)


def run_jobs(jobs: Sequence[Job], *, max_batch: int, device: torch.device | str = "cpu"
             ) -> list[JobResult | Exception]:
    """Run ``jobs`` (see the module docstring); returns, per job and in order, its result or the exception
    of the plan call it was in."""
    buckets = bucket_sizes(max_batch)
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        if job.rows > max_batch:
            raise ValueError(f"a job of {job.rows} rows exceeds max_batch {max_batch}")
        groups.setdefault(id(job.engine), []).append(i)
    results: list[JobResult | Exception | None] = [None] * len(jobs)
    for idx in groups.values():
        engine = jobs[idx[0]].engine
        if engine.program.stochastic:
            calls = [[i] for i in idx]
        else:
            calls = pack(idx, [j.rows for j in jobs], max_batch)
        for call in calls:
            try:
                outs = _run_call(engine, [jobs[i] for i in call], buckets, device)
            except Exception as e:  # noqa: BLE001 - the jobs of this call get it; the others go on
                outs = [e] * len(call)
            for i, out in zip(call, outs):
                results[i] = out
    return results  # type: ignore[return-value]


def pack(items: Sequence[int], rows: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: ``items`` (indices into ``rows``) into as few bins of at most ``capacity`` rows
    as it finds, the largest first (ties in arrival order).  Each bin is one plan call."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(items, key=lambda i: -rows[i]):
        k = next((k for k, r in enumerate(room) if r >= rows[i]), None)
        if k is None:
            bins.append([])
            room.append(capacity)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= rows[i]
    return bins


def _run_call(engine, jobs: list[Job], buckets: Sequence[int], device) -> list[JobResult]:
    rows = job_rows(jobs)
    stochastic = engine.program.stochastic
    size = rows if stochastic else bucket_for(rows, buckets)
    noise = torch.cat([j.noise for j in jobs])
    labels = torch.cat([j.labels for j in jobs])
    if size > rows:  # padding rows: zero noise, label 0; computed and dropped
        noise = torch.cat([noise, noise.new_zeros((size - rows, *noise.shape[1:]))])
        labels = torch.cat([labels, labels.new_zeros(size - rows)])
    seed = jobs[0].request.seed if stochastic else None
    out = engine(noise.to(device), seed=seed, class_labels=labels.to(device)).to("cpu", torch.float32)
    results, at = [], 0
    for j in jobs:
        results.append(JobResult(out[at:at + j.rows].clone(), size, len(jobs)))
        at += j.rows
    return results


class PlanRunner:
    """Runs batches of jobs with ``run(jobs) -> results`` on ``executor`` (one worker thread), one run at a
    time; the batches submitted while a run is under way join the next run, up to ``capacity`` rows: the
    oldest batch (alone if it is larger), then every other one that fits, in arrival order.

    Why: ``@serve.batch`` (Ray Serve 2.60) closes a batch when its wait window ends and starts forming the
    next one at once, also while the previous batch still runs.  Behind a plan call of a few hundred
    milliseconds a busy replica's backlog then arrives as many small batches that run one after another.
    Merging what waits into the next run fills the plan calls instead (continuous batching); an idle replica
    runs a lone request as soon as its batch window closes.  Use from one event loop.
    """

    def __init__(self, run: Callable[[list[Job]], list], *, capacity: int, executor: Executor):
        self._run, self._capacity, self._executor = run, capacity, executor
        self._pending: deque[tuple[list[Job], asyncio.Future]] = deque()
        self._task: asyncio.Task | None = None
        self.runs = 0  # runs so far (tests, metrics)

    async def submit(self, jobs: Sequence[Job]) -> list[JobResult | Exception]:
        """The results of ``jobs`` (in order) once the run they joined is done."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._pending.append((list(jobs), done))
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._drain())
        return await done

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while self._pending:
            take, rows, later = [], 0, deque()
            while self._pending:  # the oldest batch, then every other one that still fits, in arrival order
                jobs, done = self._pending.popleft()
                if done.done():  # a cancelled submit (its request timed out) is dropped unrun
                    continue
                if not take or rows + job_rows(jobs) <= self._capacity:
                    take.append((jobs, done))
                    rows += job_rows(jobs)
                else:
                    later.append((jobs, done))
            self._pending = later
            if not take:
                continue
            self.runs += 1
            try:
                flat = [j for jobs, _ in take for j in jobs]
                results = await loop.run_in_executor(self._executor, self._run, flat)
            except Exception as e:  # noqa: BLE001 - every request of the run gets it
                for _, done in take:
                    if not done.done():
                        done.set_exception(e)
                continue
            at = 0
            for jobs, done in take:
                if not done.done():
                    done.set_result(results[at:at + len(jobs)])
                at += len(jobs)
