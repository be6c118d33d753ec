"""The kubelet's log endpoint, so that ``kubectl logs`` works through the apiserver.

Each fake node gets one HTTPS server on ``127.0.0.1:<free port>``; the node reports InternalIP 127.0.0.1 and
``daemonEndpoints.kubeletEndpoint.Port``, and the apiserver (``--kubelet-preferred-address-types=InternalIP``)
proxies ``pods/log`` to ``GET /containerLogs/{namespace}/{pod}/{container}``. Supported query parameters:
``follow``, ``tailLines``, ``timestamps``, ``previous``, ``sinceSeconds``, ``sinceTime``, ``limitBytes``.
"""

from __future__ import annotations

import logging
import ssl
import threading
import time
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse

from . import layout
from .runtime import parse_records, read_log, render_records

log = logging.getLogger(__name__)


def _flag(query: dict[str, list[str]], name: str) -> bool:
    return query.get(name, ["false"])[0].lower() in ("true", "1")


class _Handler(BaseHTTPRequestHandler):
    server: LogServer

    def log_message(self, format: str, *args: object) -> None:
        log.debug("log server: %s", format % args)

    def do_GET(self) -> None:
        url = urlparse(self.path)
        parts = [unquote(p) for p in url.path.strip("/").split("/")]
        if parts == ["healthz"]:
            self._send_text(200, "ok")
            return
        if len(parts) != 4 or parts[0] != "containerLogs":
            self._send_text(404, f"not found: {url.path}")
            return
        _, namespace, name, container = parts
        query = parse_qs(url.query)
        directory = layout.latest_pod_dir(self.server.root, namespace, name)
        if directory is None:
            self._send_text(404, f'pod "{name}" in namespace "{namespace}" has no logs on this node')
            return
        path = layout.find_log(directory, container, previous=_flag(query, "previous"))
        if path is None:
            self._send_text(400, f'previous terminated container "{container}" in pod "{name}" not found')
            return
        since = _since(query)
        timestamps = _flag(query, "timestamps")
        tail = int(query["tailLines"][0]) if "tailLines" in query else None
        limit = int(query["limitBytes"][0]) if "limitBytes" in query else None
        text = read_log(path, timestamps=timestamps, tail_lines=tail, since=since)
        if not _flag(query, "follow"):
            body = text.encode()
            self._send_text(200, body[:limit] if limit is not None else body)
            return
        self._follow(path, text, timestamps=timestamps, limit=limit)

    def _follow(self, path: Path, first: str, *, timestamps: bool, limit: int | None) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.end_headers()  # HTTP/1.0: the body runs until the connection closes
        sent = 0
        done_path = path.with_suffix(".done")
        offset = path.stat().st_size if path.exists() else 0
        chunk = first.encode()
        try:
            while True:
                if chunk:
                    if limit is not None:
                        chunk = chunk[: max(0, limit - sent)]
                    self.wfile.write(chunk)
                    self.wfile.flush()
                    sent += len(chunk)
                    if limit is not None and sent >= limit:
                        return
                finished = done_path.exists()
                size = path.stat().st_size if path.exists() else 0
                if size > offset:
                    with path.open("rb") as handle:
                        handle.seek(offset)
                        data = handle.read(size - offset)
                    complete = data[: data.rfind(b"\n") + 1]
                    offset += len(complete)
                    records = list(parse_records(complete.decode("utf-8", "replace")))
                    chunk = render_records(records, timestamps=timestamps).encode()
                    continue
                if finished or self.server.stopping.is_set():
                    return
                chunk = b""
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            return

    def _send_text(self, code: int, text: str | bytes) -> None:
        body = text.encode() if isinstance(text, str) else text
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def _since(query: dict[str, list[str]]) -> str | None:
    if "sinceTime" in query:
        return query["sinceTime"][0]
    if "sinceSeconds" in query:
        when = datetime.now(UTC) - timedelta(seconds=int(query["sinceSeconds"][0]))
        return when.strftime("%Y-%m-%dT%H:%M:%S.%f000Z")
    return None


class LogServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path, cert: Path, key: Path, host: str = "127.0.0.1") -> None:
        super().__init__((host, 0), _Handler)
        self.root = root
        self.stopping = threading.Event()
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        self.socket = context.wrap_socket(self.socket, server_side=True)
        self._thread = threading.Thread(
            target=self.serve_forever, kwargs={"poll_interval": 0.1}, name=f"logserver-{self.port}", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.shutdown()
        self.server_close()
