"""The process: uvicorn serving the app at once (liveness), the model loaded and warmed up in the background
(readiness), the drain on SIGTERM, and `main`, the `dreambooth-serve` console script.

A failed load (or a config that cannot start, such as an empty token) writes the termination message
(`{"status": "failed", "reason", "message"}`) and exits 1. On SIGTERM the server answers /readyz 503, stops
accepting connections, lets requests in flight finish (at most `DRAIN_SECONDS`) and exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, Final

import uvicorn

from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.serving import ServeConfig, ServerDefaults
from dreambooth_trainer.lean_imports import keep_out, unused_packages
from dreambooth_trainer.result import write_termination_message
from dreambooth_trainer.serving.adapters import AdapterCache
from dreambooth_trainer.serving.app import create_app
from dreambooth_trainer.serving.config import launch
from dreambooth_trainer.serving.engine import Engine
from dreambooth_trainer.serving.images import ImageService, Lifecycle, Phase
from dreambooth_trainer.serving.runner import ModelRunner, Sample, Sampling
from dreambooth_trainer.serving.subjects import SubjectCatalog

DRAIN_SECONDS: Final = 25
"""Within a pod's default 30 s termination grace period."""
LOAD_FAILED_REASON: Final = "ModelLoadFailed"
INVALID_CONFIG_REASON: Final = "InvalidConfig"
KEEP_ALIVE_SECONDS: Final = 30


def log(level: str, event: str, **fields: Any) -> None:
    print(json.dumps({"ts": time.time(), "level": level, "event": event, **fields}), flush=True)


class _Uvicorn(uvicorn.Server):
    """uvicorn, with readiness turned off as soon as a stop is asked for (SIGTERM)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.lifecycle.phase != Phase.FAILED:
            self.lifecycle.set(Phase.DRAINING)
        super().handle_exit(sig, frame)


class Server:
    """The sampling server: `start()` (tests) or `serve()` (the console script) runs it."""

    def __init__(
        self,
        config: ServeConfig,
        host: str = "127.0.0.1",
        port: int = 0,
        workdir: Path | None = None,
        token: str | None = None,
    ) -> None:
        self.config = config
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="dreambooth-serve-"))
        self.lifecycle = Lifecycle()
        limits = config.server
        self.runner = ModelRunner(config, self.workdir)
        self.catalog = SubjectCatalog(config, self.runner.store, log=log)
        self.adapters = AdapterCache(
            self.runner,
            self.workdir,
            max_count=limits.max_loaded_adapters or ServerDefaults.MAX_LOADED_ADAPTERS,
            max_bytes=(limits.max_adapter_memory_mb or ServerDefaults.MAX_ADAPTER_MEMORY_MB) * 1024 * 1024,
            log=log,
        )
        delay_ms = (
            limits.max_batch_delay_ms if limits.max_batch_delay_ms is not None else ServerDefaults.MAX_BATCH_DELAY_MS
        )
        self.engine = Engine(
            self.runner,
            self.adapters,
            max_batch=limits.max_batch_size,
            max_delay=delay_ms / 1000,
            max_queue=limits.max_queued_requests or ServerDefaults.MAX_QUEUED_REQUESTS,
            log=log,
        )
        self.service = ImageService(config, self.runner, self.catalog, self.engine, self.lifecycle)
        self.app = create_app(self.service, self.lifecycle, token)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(2048)
        self.sock.set_inheritable(True)
        self.uvicorn = _Uvicorn(
            uvicorn.Config(
                self.app,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_keep_alive=KEEP_ALIVE_SECONDS,
                timeout_graceful_shutdown=DRAIN_SECONDS,
                h11_max_incomplete_event_size=64 * 1024,
            ),
            self.lifecycle,
        )
        self._threads: list[threading.Thread] = []
        self._loaded = threading.Event()

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    # ----- loading -----------------------------------------------------------------------------------
    def load(self) -> None:
        """Load the model, warm it up (one small generation, the configured adapters loaded), start the engine."""
        try:
            started = time.monotonic()
            self.runner.load()
            self.lifecycle.set(Phase.WARMING_UP)
            self.warm_up()
            self.engine.start()
            self.lifecycle.set(Phase.READY)
            log("info", "ready", seconds=round(time.monotonic() - started, 2), nativeSize=self.runner.native_size)
        except Exception as err:
            self.lifecycle.set(Phase.FAILED, f"{type(err).__name__}: {err}")
            log("error", "model_load_failed", error=self.lifecycle.error)
            self.uvicorn.should_exit = True
        finally:
            self._loaded.set()

    def warm_up(self) -> None:
        defaults = [(s, s.weight) for s in self.catalog.defaults()]
        fit = len(defaults) <= self.adapters.max_count
        self.adapters.activate(defaults if fit else [])
        size = min(self.runner.native_size, self.config.server.max_resolution)
        size -= size % 8
        sampling = Sampling(max(size, 8), max(size, 8), 1, self.config.server.default_scheduler, 1.0)
        self.runner.generate(sampling, [Sample("warm-up", "", 0)])

    # ----- running -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Serve and load in background threads (tests; `serve` runs uvicorn on the main thread for signals)."""
        for name, target in (("uvicorn", self._run_uvicorn), ("load", self.load)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        while not self.uvicorn.started and self._threads[0].is_alive():
            time.sleep(0.01)

    def _run_uvicorn(self) -> None:
        self.uvicorn.run(sockets=[self.sock])

    def wait_loaded(self, timeout: float) -> str:
        """Wait for the load (and warm-up) to end; returns the phase (ready or failed)."""
        self._loaded.wait(timeout)
        return self.lifecycle.phase

    def stop(self) -> None:
        """Stop serving (a stop as SIGTERM's: drain first) and the engine."""
        if self.lifecycle.phase != Phase.FAILED:
            self.lifecycle.set(Phase.DRAINING)
        self.uvicorn.should_exit = True
        for thread in self._threads[:1]:
            thread.join(DRAIN_SECONDS + 5)
        self.engine.stop()
        self.sock.close()


def serve(server: Server) -> int:
    """Run until SIGTERM (drain, exit 0) or a failed load (exit 1, the error in the termination message)."""
    loader = threading.Thread(target=server.load, name="load", daemon=True)
    loader.start()
    server.uvicorn.run(sockets=[server.sock])
    if server.lifecycle.phase == Phase.FAILED:
        write_termination_message({"status": "failed", "reason": LOAD_FAILED_REASON, "message": server.lifecycle.error})
        return 1
    server.engine.stop(timeout=5)
    log("info", "stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `dreambooth-serve`."""
    keep_out(unused_packages(None))
    try:
        settings = launch(argv)
    except InvalidInputError as err:
        log("error", "invalid_config", error=str(err))
        write_termination_message({"status": "failed", "reason": INVALID_CONFIG_REASON, "message": str(err)})
        return 1
    server = Server(settings.config, settings.host, settings.port, settings.workdir, settings.token)
    log("info", "serving", host=settings.host, port=server.port, auth=settings.token is not None)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, server.uvicorn.handle_exit)
    return serve(server)


if __name__ == "__main__":
    sys.exit(main())
