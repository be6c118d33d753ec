"""Live progress: Prometheus metrics and the `/progress` JSON, served on one port.

`GET /metrics` (Prometheus text format), `GET /progress` (`dreambooth_api.progress.ProgressDocument`, the contract
the operator reads; docs/contracts.md), `GET /healthz` ("ok"). The server binds `env.BIND_ADDRESS` (default
0.0.0.0) port `env.METRICS_PORT` (default `env.TRAINER_METRICS_PORT`) and runs in a daemon thread. Every metric
carries the labels job, namespace and rank.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from dreambooth_api import env
from dreambooth_api.progress import ProgressDocument, TrainerPhase

PREFIX = "dreambooth_trainer"

ACTIVE_PHASES = frozenset(
    {
        TrainerPhase.INITIALIZING,
        TrainerPhase.GENERATING_PRIORS,
        TrainerPhase.TRAINING,
        TrainerPhase.CHECKPOINTING,
        TrainerPhase.EXPORTING,
        TrainerPhase.EVALUATING,
    }
)
"""Phases in which a rank holds its GPU (the others are its last words)."""


class ActiveSeconds(Collector):
    """`dreambooth_trainer_active_seconds_total`: wall seconds this rank has spent in `ACTIVE_PHASES`, read at each
    scrape (so a job shorter than a scrape interval still counts, unlike sampling the phase gauge)."""

    def __init__(self, labels: dict[str, str], clock: Any = time.monotonic) -> None:
        self._labels = labels
        self._clock = clock
        self._lock = threading.Lock()
        self._total = 0.0
        self._since: float | None = None

    def phase(self, phase: TrainerPhase) -> None:
        with self._lock:
            now = self._clock()
            if phase in ACTIVE_PHASES and self._since is None:
                self._since = now
            elif phase not in ACTIVE_PHASES and self._since is not None:
                self._total += now - self._since
                self._since = None

    def seconds(self) -> float:
        with self._lock:
            return self._total + (self._clock() - self._since if self._since is not None else 0.0)

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            f"{PREFIX}_active_seconds",
            "Wall seconds this rank spent initializing, generating priors, training, checkpointing or exporting: "
            "the GPU-seconds it held, with one GPU per rank.",
            labels=list(self._labels),
        )
        family.add_metric(list(self._labels.values()), self.seconds())
        yield family


class Metrics:
    """The trainer's Prometheus metrics in their own registry (so several can live in one test process)."""

    def __init__(self, job: str, namespace: str, rank: int) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.labels = {"job": job, "namespace": namespace, "rank": str(rank)}
        names = list(self.labels)
        r = self.registry

        def gauge(name: str, doc: str, extra: tuple[str, ...] = ()) -> Gauge:
            return Gauge(f"{PREFIX}_{name}", doc, [*names, *extra], registry=r)

        def counter(name: str, doc: str) -> Counter:
            return Counter(f"{PREFIX}_{name}", doc, names, registry=r)

        self.step = gauge("step", "Optimizer steps completed.").labels(**self.labels)
        self.total_steps = gauge("total_steps", "Optimizer steps the run will take.").labels(**self.labels)
        self.loss = gauge("loss", "Training loss of the last step (mean over its micro-batches).").labels(**self.labels)
        self.lr = gauge("learning_rate", "Learning rate of the last step (first parameter group).").labels(
            **self.labels
        )
        self.steps_per_second = gauge("steps_per_second", "Optimizer steps per second (recent window).").labels(
            **self.labels
        )
        self.images_per_second = gauge(
            "images_per_second", "Training images per second on this rank (recent window)."
        ).labels(**self.labels)
        self.data_wait = counter("data_wait_seconds", "Seconds the loop waited for the next batch.").labels(
            **self.labels
        )
        self.gpu_allocated = gauge("gpu_memory_allocated_bytes", "CUDA memory allocated by tensors.").labels(
            **self.labels
        )
        self.gpu_reserved = gauge("gpu_memory_reserved_bytes", "CUDA memory reserved by the caching allocator.").labels(
            **self.labels
        )
        self.checkpoints = counter("checkpoints", "Complete checkpoints written.").labels(**self.labels)
        self.checkpoint_upload_seconds = Histogram(
            f"{PREFIX}_checkpoint_upload_seconds",
            "Seconds to serialize and upload one checkpoint (in the background).",
            names,
            buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        ).labels(**self.labels)
        self.checkpoint_bytes = counter("checkpoint_bytes", "Bytes of complete checkpoints uploaded.").labels(
            **self.labels
        )
        self.checkpoint_last_bytes = gauge("checkpoint_last_bytes", "Size of the last complete checkpoint.").labels(
            **self.labels
        )
        self.checkpoint_stall_seconds = Histogram(
            f"{PREFIX}_checkpoint_stall_seconds",
            "Seconds the training loop was blocked per checkpoint (snapshot, and waiting for an upload in flight).",
            names,
            buckets=(0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        ).labels(**self.labels)
        self.checkpoint_failures = counter("checkpoint_upload_failures", "Checkpoint writes that failed.").labels(
            **self.labels
        )
        self.last_checkpoint_step = gauge("last_checkpoint_step", "Step of the newest complete checkpoint.").labels(
            **self.labels
        )
        self._phase = gauge("phase", "1 for the current phase, 0 for the others.", ("phase",))
        self.active_seconds = ActiveSeconds(self.labels)
        r.register(self.active_seconds)
        self.set_phase(TrainerPhase.INITIALIZING)

    def set_phase(self, phase: TrainerPhase) -> None:
        self.active_seconds.phase(phase)
        for p in TrainerPhase:
            self._phase.labels(**self.labels, phase=p.value).set(1.0 if p is phase else 0.0)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class ProgressState:
    """What /progress reports: a `ProgressDocument`, replaced by the loop and read by the HTTP thread under a lock."""

    def __init__(self, total_steps: int = 0) -> None:
        self._lock = threading.Lock()
        self._document = ProgressDocument(phase=TrainerPhase.INITIALIZING, total_steps=total_steps)

    @property
    def document(self) -> ProgressDocument:
        """The current document (never changed in place: `update` replaces it)."""
        with self._lock:
            return self._document

    def update(self, **fields: Any) -> None:
        """Set fields of the document by their Python names (validated, as the operator will read them)."""
        with self._lock:
            self._document = ProgressDocument.model_validate({**self._document.model_dump(), **fields})

    def to_wire(self) -> dict[str, Any]:
        return self.document.to_wire()


class RateMeter:
    """Steps and images per second over a sliding window of the last `window` steps."""

    def __init__(self, window: int = 20) -> None:
        self._times: deque[tuple[float, int]] = deque(maxlen=window + 1)

    def reset(self) -> None:
        self._times.clear()

    def tick(self, images: int, now: float | None = None) -> None:
        self._times.append((time.monotonic() if now is None else now, images))

    def rates(self) -> tuple[float | None, float | None]:
        if len(self._times) < 2:
            return None, None
        elapsed = self._times[-1][0] - self._times[0][0]
        if elapsed <= 0:
            return None, None
        steps = len(self._times) - 1
        images = sum(n for _, n in list(self._times)[1:])
        return steps / elapsed, images / elapsed


class Progress:
    """Metrics + progress state, with one helper per event of the loop."""

    def __init__(self, job: str, namespace: str, rank: int, total_steps: int) -> None:
        self.metrics = Metrics(job, namespace, rank)
        self.state = ProgressState(total_steps)
        self.metrics.total_steps.set(total_steps)
        self.rate = RateMeter()

    def set_phase(self, phase: TrainerPhase) -> None:
        self.state.update(phase=phase)
        self.metrics.set_phase(phase)

    def on_step(self, step: int, loss: float | None, lr: float, images: int, data_wait: float) -> None:
        """A finished optimizer step; `loss` None when it is not read yet (`on_loss` sets it later)."""
        self.rate.tick(images)
        sps, ips = self.rate.rates()
        total = self.state.document.total_steps
        eta = (total - step) / sps if sps else None
        self.state.update(step=step, lr=lr, steps_per_second=sps, eta_seconds=eta)
        if loss is not None:
            self.on_loss(loss)
        m = self.metrics
        m.step.set(step)
        m.lr.set(lr)
        if sps is not None and ips is not None:
            m.steps_per_second.set(sps)
            m.images_per_second.set(ips)
        m.data_wait.inc(data_wait)
        self._gpu_memory()

    def on_loss(self, loss: float) -> None:
        """The loss of the last step that was read (the loop reads device losses in batches)."""
        self.state.update(loss=loss)
        self.metrics.loss.set(loss)

    def _gpu_memory(self) -> None:
        import torch

        if torch.cuda.is_available():
            self.metrics.gpu_allocated.set(torch.cuda.memory_allocated())
            self.metrics.gpu_reserved.set(torch.cuda.memory_reserved())

    def on_resume(self, step: int) -> None:
        self.state.update(step=step, resumed_from=step)
        self.metrics.step.set(step)
        self.rate.reset()

    def on_stall(self, seconds: float) -> None:
        self.metrics.checkpoint_stall_seconds.observe(seconds)

    def on_checkpoint(self, step: int, uri: str, time_iso: str, nbytes: int, upload_seconds: float) -> None:
        self.state.update(last_checkpoint={"step": step, "uri": uri, "time": time_iso})
        m = self.metrics
        m.checkpoints.inc()
        m.checkpoint_bytes.inc(nbytes)
        m.checkpoint_last_bytes.set(nbytes)
        m.checkpoint_upload_seconds.observe(upload_seconds)
        m.last_checkpoint_step.set(step)

    def on_checkpoint_failure(self) -> None:
        self.metrics.checkpoint_failures.inc()


def _handler(progress: Progress) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                # The 0.0.4 text format: every Prometheus 2.x understands it (our names are all legacy-valid).
                self._send(200, CONTENT_TYPE_PLAIN_0_0_4, progress.metrics.exposition())
            elif path == "/progress":
                self._send(200, "application/json", json.dumps(progress.state.to_wire()).encode())
            elif path == "/healthz":
                self._send(200, "text/plain; charset=utf-8", b"ok\n")
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return  # scrapes every few seconds would flood the JSON log

    return Handler


class ProgressServer:
    """Serves a Progress on (host, port) from a daemon thread. Port 0 picks a free port (see `.port`)."""

    def __init__(self, progress: Progress, host: str | None = None, port: int | None = None) -> None:
        host = host if host is not None else os.environ.get(env.BIND_ADDRESS, "0.0.0.0")  # noqa: S104 (the pod IP in k8s)
        port = port if port is not None else int(os.environ.get(env.METRICS_PORT, str(env.TRAINER_METRICS_PORT)))
        self._server = ThreadingHTTPServer((host, port), _handler(progress))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="progress-server", daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> ProgressServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
