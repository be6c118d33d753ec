"""Subjects' LoRA adapters in the pipeline: loaded on first use, kept in an LRU bounded by count and bytes.

Isolation: a pipeline call runs with exactly one set of active adapters (`activate`), and the engine batches only
requests whose adapters (names and weights) are equal, so requests for different subjects never share a call and
never see each other's weights. (The alternative, per-sample adapters inside one call, needs LoRA layers that take
a per-row adapter index; diffusers' pipelines have none.)

Threads: `prefetch` (any thread) starts the download from object storage in a small pool, so that a cold subject's
download overlaps other batches; everything that touches the pipeline (`activate`: load, evict, set the active set)
runs on the engine's worker thread, between pipeline calls.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from dreambooth_trainer.serving.metrics import (
    ADAPTER_BYTES,
    ADAPTER_EVICTIONS,
    ADAPTER_HITS,
    ADAPTER_LOAD_SECONDS,
    ADAPTER_LOADS,
    ADAPTER_SWITCH_SECONDS,
    ADAPTERS_LOADED,
)
from dreambooth_trainer.serving.runner import MODEL_ADAPTER, ModelRunner, download_lora
from dreambooth_trainer.serving.subjects import Subject
from dreambooth_trainer.storage import ObjectNotFoundError

DOWNLOAD_THREADS: Final = 4


class SubjectLoadError(Exception):
    """A subject's weights could not be downloaded or loaded; `missing` when there are none at its URI."""

    def __init__(self, subject: Subject, error: BaseException) -> None:
        self.subject = subject
        self.missing = isinstance(error, ObjectNotFoundError)
        reason = f"no LoRA weights at {subject.uri}" if self.missing else f"{type(error).__name__}: {error}"
        super().__init__(f"subject {subject.name}: {reason}")


@dataclass
class LoadedAdapter:
    subject: Subject
    bytes: int


class AdapterCache:
    """The adapters loaded in `runner`'s pipeline (the model's own LoRA, `MODEL_ADAPTER`, is pinned and not counted)."""

    def __init__(
        self,
        runner: ModelRunner,
        workdir: Path,
        *,
        max_count: int,
        max_bytes: int,
        log: Callable[..., None] | None = None,
    ) -> None:
        self.runner = runner
        self.workdir = workdir
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._log = log or (lambda *_a, **_k: None)
        self._loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self._downloads: dict[Subject, Future[Path]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="adapter-download")
        self._active: tuple[tuple[str, float], ...] | None = None
        self.on_ready: Callable[[], None] = lambda: None
        """Called (from a download thread) when a download finished: the engine re-plans its next batch."""

    # ----- any thread --------------------------------------------------------------------------------
    def prefetch(self, subject: Subject) -> None:
        """Start downloading the subject's weights unless they are loaded or on their way."""
        with self._lock:
            future = self._start_download(subject)
        if future is not None:
            future.add_done_callback(lambda _f: self.on_ready())

    def ready(self, subjects: Sequence[Subject]) -> bool:
        """True when every subject is loaded or its download has ended (well or not): `activate` will not wait.
        A subject neither loaded nor downloading (evicted since its request came) starts downloading."""
        started = []
        with self._lock:
            waiting = False
            for s in subjects:
                loaded = self._loaded.get(s.name)
                if loaded is not None and loaded.subject == s:
                    continue
                future = self._downloads.get(s)
                if future is None:
                    future = self._start_download(s)
                    started.append(future)
                if future is None or not future.done():
                    waiting = True
        for future in started:
            if future is not None:
                future.add_done_callback(lambda _f: self.on_ready())
        return not waiting

    def _start_download(self, subject: Subject) -> Future[Path] | None:
        """A new download of the subject's weights (holding the lock), or None when loaded or on their way."""
        loaded = self._loaded.get(subject.name)
        if (loaded is not None and loaded.subject == subject) or subject in self._downloads:
            return None
        future = self._pool.submit(self._download, subject)
        self._downloads[subject] = future
        return future

    def loaded(self) -> list[str]:
        """Names of the loaded adapters, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _download(self, subject: Subject) -> Path:
        digest = hashlib.sha256(subject.uri.encode()).hexdigest()[:16]
        target = self.workdir / "adapters" / f"{subject.name}-{digest}"
        started = time.perf_counter()
        download_lora(self.runner.store, subject.uri, target)
        self._log("info", "adapter_downloaded", subject=subject.name, seconds=round(time.perf_counter() - started, 3))
        return target

    # ----- the engine's worker thread ----------------------------------------------------------------
    def activate(self, wanted: Sequence[tuple[Subject, float]]) -> None:
        """Make exactly `wanted` (plus a LoRA modelUri) the pipeline's active adapters: load those missing (evicting
        the least recently used beyond the bounds, never one of `wanted`), then set the active set and weights.
        Raises SubjectLoadError."""
        names = {s.name for s, _ in wanted}
        for subject, _ in wanted:
            with self._lock:
                loaded = self._loaded.get(subject.name)
            if loaded is not None and loaded.subject != subject:
                self._evict(subject.name)  # republished under another URI
                loaded = None
            if loaded is not None:
                with self._lock:
                    self._loaded.move_to_end(subject.name)
                ADAPTER_HITS.inc()
                continue
            self._make_room(keep=names, incoming=1)
            self._load(subject)
        self._make_room(keep=names, incoming=0)
        self._set_active(tuple((s.name, float(w)) for s, w in wanted))

    def _load(self, subject: Subject) -> None:
        started = time.perf_counter()
        self.prefetch(subject)
        with self._lock:
            future = self._downloads[subject]
        try:
            folder = future.result()
        except Exception as err:
            with self._lock:
                self._downloads.pop(subject, None)
            raise SubjectLoadError(subject, err) from err
        pipe = self.runner.pipe
        self._active = None  # loading an adapter may change the pipeline's active set
        try:
            pipe.load_lora_weights(str(folder), adapter_name=subject.name)
        except Exception as err:
            self._forget(subject.name, folder)
            with self._lock:  # the folder is gone: the next request downloads again (the weights may be fixed)
                self._downloads.pop(subject, None)
            raise SubjectLoadError(subject, err) from err
        size = adapter_bytes(pipe, subject.name)
        with self._lock:
            self._downloads.pop(subject, None)
            self._loaded[subject.name] = LoadedAdapter(subject, size)
        seconds = time.perf_counter() - started
        ADAPTER_LOADS.inc()
        ADAPTER_LOAD_SECONDS.observe(seconds)
        self._gauges()
        self._log("info", "adapter_loaded", subject=subject.name, bytes=size, seconds=round(seconds, 3))

    def _make_room(self, keep: set[str], incoming: int) -> None:
        while True:
            with self._lock:
                total = sum(a.bytes for a in self._loaded.values())
                over = len(self._loaded) + incoming > self.max_count or total > self.max_bytes
                victim = next((n for n in self._loaded if n not in keep), None)
            if not over or victim is None:
                return
            self._evict(victim)
            ADAPTER_EVICTIONS.inc()

    def _evict(self, name: str) -> None:
        with self._lock:
            gone = self._loaded.pop(name, None)
        self._active = None
        self._forget(name, None)
        if gone is not None:
            digest = hashlib.sha256(gone.subject.uri.encode()).hexdigest()[:16]
            shutil.rmtree(self.workdir / "adapters" / f"{name}-{digest}", ignore_errors=True)
            self._log("info", "adapter_evicted", subject=name)
        self._gauges()

    def _forget(self, name: str, folder: Path | None) -> None:
        """Delete an adapter from the pipeline (also a half-loaded one)."""
        pipe = self.runner.pipe
        try:
            if name in _pipeline_adapters(pipe):
                pipe.delete_adapters([name])
        except Exception as err:  # a half-loaded adapter: nothing more to undo
            self._log("warning", "adapter_delete_failed", subject=name, error=f"{type(err).__name__}: {err}")
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)

    def _set_active(self, wanted: tuple[tuple[str, float], ...]) -> None:
        target = (((MODEL_ADAPTER, 1.0),) if self.runner.model_lora else ()) + wanted
        if target == self._active:
            return
        started = time.perf_counter()
        pipe = self.runner.pipe
        if target:
            pipe.enable_lora()
            pipe.set_adapters([n for n, _ in target], [w for _, w in target])
        elif _pipeline_adapters(pipe):
            pipe.disable_lora()
        self._active = target
        ADAPTER_SWITCH_SECONDS.observe(time.perf_counter() - started)

    def _gauges(self) -> None:
        with self._lock:
            ADAPTERS_LOADED.set(len(self._loaded))
            ADAPTER_BYTES.set(sum(a.bytes for a in self._loaded.values()))


def _pipeline_adapters(pipe: Any) -> set[str]:
    names: set[str] = set()
    for adapters in pipe.get_list_adapters().values():
        names.update(adapters)
    return names


def adapter_bytes(pipe: Any, name: str) -> int:
    """Bytes of one adapter's weights in the pipeline (all its LoRA layers, UNet and text encoder)."""
    pattern = re.compile(rf"\.lora_[A-Za-z_]+\.{re.escape(name)}\.")
    total = 0
    for module in (pipe.unet, getattr(pipe, "text_encoder", None)):
        if module is None:
            continue
        for key, param in module.named_parameters():
            if pattern.search(key):
                total += param.numel() * param.element_size()
    return total
