"""The dynamic batching engine: one worker thread runs the pipeline; requests wait in a bounded queue.

Batching (as Triton's and vLLM's schedulers do it, at the granularity of a whole pipeline call):
- A batch's key is the request's `Sampling` (size, steps, scheduler, guidance scale) and its active adapters (names
  and weights). The worker takes the oldest waiting request whose adapters are ready (loaded, or downloaded), then
  adds the following requests with the same key, in arrival order, while the batch holds at most `max_batch`
  images, waiting at most `max_delay` seconds after the first request arrived for more to come. A request asking
  for more than `max_batch` images runs alone, in chunks.
- Every image has its own `torch.Generator` seeded with the request's seed + its index, so a request's images do not
  depend on what else is in its batch (`runner.generate`; the tolerance is stated in docs/contracts.md).
- Different adapters never share a call (`adapters.py`).

Backpressure: `submit` raises QueueFullError when `max_queue` requests wait (the route answers 429 with
Retry-After). Each job has a deadline; a job past it, or whose client went away (`Job.cancel`), is dropped before
it runs, and a running call whose jobs are all gone stops at the next denoising step.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Final

from dreambooth_trainer.serving.adapters import AdapterCache, SubjectLoadError
from dreambooth_trainer.serving.metrics import (
    BATCH_REQUESTS,
    BATCH_SECONDS,
    BATCH_SIZE,
    GPU_MEMORY_ALLOCATED,
    GPU_MEMORY_RESERVED,
    IMAGES,
    QUEUE_DEPTH,
)
from dreambooth_trainer.serving.runner import ModelRunner, Sample, Sampling
from dreambooth_trainer.serving.subjects import Subject

READY_POLL_SECONDS: Final = 0.05
"""How often the worker looks again while every waiting request's adapter is still downloading."""


class QueueFullError(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class DeadlineExceededError(Exception):
    """The job's deadline passed before its images were generated."""


class CancelledJobError(Exception):
    """The client went away; nobody waits for the result."""


class GenerationError(Exception):
    """The pipeline call failed; `out_of_memory` when CUDA ran out of memory (the request may succeed later)."""

    def __init__(self, error: BaseException) -> None:
        super().__init__(f"{type(error).__name__}: {error}")
        self.out_of_memory = type(error).__name__ == "OutOfMemoryError" or "out of memory" in str(error).lower()


@dataclass(frozen=True)
class BatchKey:
    sampling: Sampling
    adapters: tuple[tuple[str, float], ...]
    """Active adapters, sorted by name."""


@dataclass(eq=False)
class Job:
    """One request's work: `samples` (one per image) under `key`; its result is a list of PIL images."""

    key: BatchKey
    subjects: tuple[tuple[Subject, float], ...]
    samples: list[Sample]
    deadline: float
    """time.monotonic() after which the work is dropped."""
    enqueued: float = field(default_factory=time.monotonic)
    future: Future[list[Any]] = field(default_factory=Future)
    cancelled: bool = False

    @property
    def n(self) -> int:
        return len(self.samples)

    def cancel(self) -> None:
        self.cancelled = True

    def dead(self, now: float) -> bool:
        return self.cancelled or now >= self.deadline


class Engine:
    """The queue and the worker thread over a loaded `ModelRunner`."""

    def __init__(
        self,
        runner: ModelRunner,
        adapters: AdapterCache,
        *,
        max_batch: int,
        max_delay: float,
        max_queue: int,
        log: Callable[..., None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runner = runner
        self.adapters = adapters
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_queue = max_queue
        self._log = log or (lambda *_a, **_k: None)
        self._clock = clock
        self._queue: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._seconds_per_image = 1.0
        """A running average of pipeline time per image (for Retry-After)."""
        adapters.on_ready = self._wake

    # ----- the event loop's side ---------------------------------------------------------------------
    def submit(self, job: Job) -> Future[list[Any]]:
        """Queue a job; raises QueueFullError when `max_queue` jobs wait."""
        with self._cond:
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(self.retry_after())
            self._queue.append(job)
            QUEUE_DEPTH.set(len(self._queue))
            self._cond.notify_all()
        for subject, _ in job.subjects:
            self.adapters.prefetch(subject)
        return job.future

    def cancel(self, job: Job) -> None:
        """The client went away: drop the job if it waits, and let a running call stop when nobody needs it."""
        job.cancel()
        self._wake()

    def retry_after(self) -> int:
        """Seconds until the queue has likely room again (at least 1)."""
        waiting = sum(j.n for j in self._queue) + self.max_batch
        return max(1, math.ceil(waiting * self._seconds_per_image))

    @property
    def depth(self) -> int:
        return len(self._queue)

    # ----- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Finish the queued work (or fail it after `timeout`) and stop the worker."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            for job in self._queue:
                _fail(job, DeadlineExceededError("the server is stopping"))
            self._queue.clear()
            QUEUE_DEPTH.set(0)
        self.adapters.close()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    # ----- the worker thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as err:  # never let the worker die: fail the batch and go on
                self._log("error", "batch_failed", error=f"{type(err).__name__}: {err}")
                error = err if isinstance(err, GenerationError) else GenerationError(err)
                for job in batch:
                    _fail(job, error)

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                self._drop_dead()
                if not self._queue:
                    if self._stopping:
                        return None
                    self._cond.wait()
                    continue
                head = next((j for j in self._queue if self.adapters.ready([s for s, _ in j.subjects])), None)
                if head is None:
                    self._cond.wait(READY_POLL_SECONDS)
                    continue
                batch = [head]
                if head.n < self.max_batch:
                    self._gather(batch)
                for job in batch:
                    self._queue.remove(job)
                QUEUE_DEPTH.set(len(self._queue))
                return batch

    def _gather(self, batch: list[Job]) -> None:
        """Add compatible jobs to `batch` until it is full or the head has waited `max_delay` (holding the lock)."""
        head = batch[0]
        until = head.enqueued + self.max_delay
        while True:
            images = sum(j.n for j in batch)
            for job in self._queue:
                if job not in batch and job.key == head.key and not job.cancelled and images + job.n <= self.max_batch:
                    batch.append(job)
                    images += job.n
            now = self._clock()
            if images >= self.max_batch or now >= until or self._stopping:
                return
            self._cond.wait(until - now)

    def _drop_dead(self) -> None:
        now = self._clock()
        for job in [j for j in self._queue if j.dead(now)]:
            self._queue.remove(job)
            _fail(job, CancelledJobError() if job.cancelled else DeadlineExceededError("deadline passed in the queue"))
        QUEUE_DEPTH.set(len(self._queue))

    def _run(self, batch: list[Job]) -> None:
        now = self._clock()
        live = []
        for job in batch:
            if job.dead(now):
                _fail(job, CancelledJobError() if job.cancelled else DeadlineExceededError("deadline passed"))
            else:
                live.append(job)
        if not live:
            return
        key = live[0].key
        try:
            self.adapters.activate(live[0].subjects)
        except SubjectLoadError as err:
            for job in live:
                _fail(job, err)
            return

        def nobody_waits() -> bool:
            t = self._clock()
            return all(j.dead(t) for j in live)

        samples = [s for job in live for s in job.samples]
        images: list[Any] = []
        for start in range(0, len(samples), self.max_batch):
            chunk = samples[start : start + self.max_batch]
            images.extend(self._call(key.sampling, chunk, nobody_waits, requests=len(live)))
            if nobody_waits():
                break
        offset, now = 0, self._clock()
        for job in live:
            mine = images[offset : offset + job.n]
            offset += job.n
            if job.cancelled:
                _fail(job, CancelledJobError())
            elif job.dead(now) or len(mine) < job.n:  # possibly cut short: never answer an unfinished image
                _fail(job, DeadlineExceededError("deadline passed while generating"))
            else:
                job.future.set_result(mine)

    def _call(
        self, sampling: Sampling, samples: Sequence[Sample], stop: Callable[[], bool], requests: int
    ) -> list[Any]:
        started = time.perf_counter()
        try:
            images = self.runner.generate(sampling, samples, stop)
        except Exception as err:
            raise GenerationError(err) from err
        seconds = time.perf_counter() - started
        BATCH_SIZE.observe(len(samples))
        BATCH_REQUESTS.observe(requests)
        BATCH_SECONDS.observe(seconds)
        IMAGES.inc(len(images))
        self._seconds_per_image = 0.8 * self._seconds_per_image + 0.2 * seconds / max(1, len(samples))
        allocated, reserved = self.runner.gpu_memory()
        GPU_MEMORY_ALLOCATED.set(allocated)
        GPU_MEMORY_RESERVED.set(reserved)
        return images


def _fail(job: Job, error: BaseException) -> None:
    if not job.future.done():
        job.future.set_exception(error)
