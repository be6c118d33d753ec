"""The HTTP server around a `ModelRunner`, its drain on SIGTERM, and `main`, the `dreambooth-serve` console script."""

from __future__ import annotations

import base64
import json
import os
import signal
import tempfile
import threading
import time
from collections.abc import Mapping
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from dreambooth_api import env
from dreambooth_api.serving import ServeConfig
from dreambooth_trainer.lean_imports import keep_out, unused_packages
from dreambooth_trainer.result import write_termination_message
from dreambooth_trainer.serving.metrics import INFLIGHT, LATENCY, READY, REQUESTS
from dreambooth_trainer.serving.protocol import (
    MAX_BODY_BYTES,
    GenerateRequest,
    content_length,
    error_status,
    load_serve_config,
    token_matches,
)
from dreambooth_trainer.serving.runner import ModelRunner

SOCKET_TIMEOUT_SECONDS = 30
DRAIN_SECONDS = 25.0  # within a pod's default 30 s termination grace period
LOAD_FAILED_REASON = "ModelLoadFailed"


def log(level: str, event: str, **fields: Any) -> None:
    print(json.dumps({"level": level, "event": event, **fields}), flush=True)


class Server:
    """The HTTP server around a `ModelRunner`; `start()` loads the model in the background."""

    def __init__(
        self, config: ServeConfig, host: str = "127.0.0.1", port: int = 8080, workdir: Path | None = None
    ) -> None:
        self.sampler = ModelRunner(config, workdir or Path(tempfile.mkdtemp(prefix="dreambooth-serve-")))
        self.token = os.environ.get(env.SERVE_TOKEN) or None
        self.state = "loading"
        self.error = ""
        self.stop_requested = threading.Event()
        """Set by SIGTERM, or when loading failed: `serve` then drains or exits."""
        self.inflight = 0
        self._idle = threading.Condition()
        self.httpd = ThreadingHTTPServer((host, port), _handler(self))
        self.httpd.daemon_threads = True
        self._threads: list[threading.Thread] = []

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def _load(self) -> None:
        try:
            self.sampler.load()
            self.state = "ready"
            READY.set(1)
        except Exception as err:
            self.state = "failed"
            self.error = f"{type(err).__name__}: {err}"
            log("error", "model_load_failed", error=self.error)
            self.stop_requested.set()

    def start(self) -> None:
        for target in (self._load, self.httpd.serve_forever):
            thread = threading.Thread(target=target, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wait_loaded(self, timeout: float) -> str:
        self._threads[0].join(timeout)
        return self.state

    def begin_request(self) -> None:
        with self._idle:
            self.inflight += 1

    def end_request(self) -> None:
        with self._idle:
            self.inflight -= 1
            self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Answer 503 from now on, stop accepting connections and wait for requests in flight; True when none is
        left within `timeout`."""
        self.state = "draining"
        READY.set(0)
        self.stop()
        with self._idle:
            return self._idle.wait_for(lambda: self.inflight == 0, timeout)

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(server: Server, drain_seconds: float = DRAIN_SECONDS) -> int:
    """Run until the model fails to load (exit 1, error in the termination message) or a stop is requested
    (SIGTERM: drain, exit 0)."""
    server.start()
    server.stop_requested.wait()
    if server.state == "failed":
        write_termination_message({"status": "failed", "reason": LOAD_FAILED_REASON, "message": server.error})
        server.stop()
        return 1
    drained = server.drain(drain_seconds)
    log("info" if drained else "warning", "stopped", inflight=server.inflight)
    return 0


def _handler(server: Server) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        timeout = SOCKET_TIMEOUT_SECONDS

        def log_message(self, format: str, *args: Any) -> None:
            return

        def _send(self, code: int, body: bytes, content_type: str, headers: Mapping[str, str] | None = None) -> None:
            if self.command == "POST" and self.path == "/generate":
                REQUESTS.labels(code=str(code)).inc()  # before the answer, so that a client sees it counted
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, code: int, data: Any) -> None:
            self._send(code, json.dumps(data).encode(), "application/json")

        def do_GET(self) -> None:
            if self.path == "/healthz":
                if server.state == "ready":
                    self._json(200, {"status": "ok"})
                elif server.state in ("loading", "draining"):
                    self._json(503, {"status": server.state})
                else:
                    self._json(500, {"status": "failed", "error": server.error})
            elif self.path == "/metrics":
                self._send(200, generate_latest(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": "not found"})

        def do_POST(self) -> None:
            if self.path != "/generate":
                self._reject(HTTPStatus.NOT_FOUND, "not found")
                return
            start = time.monotonic()
            INFLIGHT.inc()
            server.begin_request()
            try:
                self._generate()
            finally:
                server.end_request()
                INFLIGHT.dec()
                LATENCY.observe(time.monotonic() - start)

        def _fail(self, code: HTTPStatus, message: str) -> int:
            self._json(code, {"error": message})
            return int(code)

        def _reject(self, code: HTTPStatus, message: str) -> int:
            """Answer before reading the body: drain a small one (keep-alive stays usable), else close."""
            length = content_length(self.headers.get("Content-Length"))
            if length is not None and length <= MAX_BODY_BYTES and server.state != "draining":
                self.rfile.read(length)
            else:
                self.close_connection = True
            return self._fail(code, message)

        def _refusal(self) -> tuple[HTTPStatus, str] | None:
            """Why the request is refused before its body is read, or None."""
            if server.token and not token_matches(self.headers.get("Authorization"), server.token):
                return HTTPStatus.UNAUTHORIZED, "missing or wrong bearer token"
            if server.state != "ready":
                return HTTPStatus.SERVICE_UNAVAILABLE, f"model is {server.state}"
            length = content_length(self.headers.get("Content-Length"))
            if length is None:
                return HTTPStatus.BAD_REQUEST, "Content-Length must be a non-negative integer"
            if length > MAX_BODY_BYTES:
                return HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large"
            return None

        def _generate(self) -> int:
            refusal = self._refusal()
            if refusal is not None:
                return self._reject(*refusal)
            length = content_length(self.headers.get("Content-Length")) or 0
            try:
                req = GenerateRequest.model_validate_json(self.rfile.read(length))
            except ValidationError as err:
                reason = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
                return self._fail(HTTPStatus.BAD_REQUEST, reason)
            problem = server.sampler.check(req)
            if problem:
                return self._fail(HTTPStatus.BAD_REQUEST, problem)
            return self._answer(req)

        def _answer(self, req: GenerateRequest) -> int:
            from dreambooth_trainer.imageio import encode_png

            try:
                images, seed = server.sampler.generate(req)
                pngs = [encode_png(img) for img in images]
            except Exception as err:
                log("error", "generate_failed", error=f"{type(err).__name__}: {err}")
                return self._fail(error_status(err), f"generation failed: {type(err).__name__}: {err}")
            if req.format == "png" and len(pngs) == 1:
                self._send(200, pngs[0], "image/png", {"X-Seed": str(seed)})
            else:
                self._json(200, {"images": [base64.b64encode(p).decode() for p in pngs], "seed": seed})
            return 200

    return Handler


def main() -> int:
    """Entry point of `dreambooth-serve`."""
    keep_out(unused_packages(None))
    config = load_serve_config()
    host = os.environ.get(env.BIND_ADDRESS, "0.0.0.0")  # noqa: S104 - a pod's server listens everywhere
    port = int(os.environ.get(env.SERVE_PORT, str(env.SERVE_DEFAULT_PORT)))
    workdir = Path(os.environ.get(env.WORKDIR) or tempfile.mkdtemp(prefix="dreambooth-serve-"))
    server = Server(config, host, port, workdir)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop_requested.set())
    log("info", "serving", host=host, port=server.port)
    return serve(server)
