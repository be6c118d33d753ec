"""A fault-injecting HTTP/1.1 proxy for the S3 server: the storage-fault tests put it between the trainer and
SeaweedFS (issue 17, chaos: storage faults).

`FaultProxy(upstream, rate=0.1, seed=...)` listens on 127.0.0.1 (a free port; `endpoint` is its URL) and forwards
each request unchanged (headers and body as the client signed them) to `upstream`. For a `rate` share of the
requests, drawn from a `random.Random(seed)` (the seed is printed when the proxy starts and is in `repr`), it
injects one fault of `kinds`:

- `error500`: `500 InternalError` (S3's XML error); the request never reaches the server;
- `slowdown`: `503 SlowDown`, S3's throttling answer; the request never reaches the server;
- `reset`: the connection reset (RST) before the request is forwarded;
- `latency`: the request forwarded after a delay (`latency` seconds, uniform);
- `truncate`: the response's head (with its real Content-Length), half its body, then a reset; a response
  without a body (a PUT's) is lost whole, after the server acted on the request.

`down = True` is an outage: every request is reset until it is False again. `deny_writes_under` ("/bucket/prefix")
answers every write (PUT, POST, DELETE) whose path starts with it `403 AccessDenied`, which botocore does not retry:
a bucket policy that denies a prefix (counted as `denied`). `injected` counts the faults by kind, `requests` every
request seen.

Bounded: loopback only, at most `max_connections` client connections at once (the others wait to be accepted), a
request head of at most 64 KiB, bodies of at most `max_body` bytes (413 beyond), and every read from the client
or the server times out after `timeout` seconds. One upstream connection per request (`Connection: close`
added when the client sent none; SigV4 signs neither it nor `Expect`, which the proxy answers itself with
`100 Continue`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import Counter
from collections.abc import Awaitable, Iterator, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

KINDS = ("error500", "slowdown", "reset", "latency", "truncate")
HEAD_LIMIT = 64 * 1024
NO_BODY_STATUS = {204, 304}
HOP = (b"connection", b"keep-alive")
"""The server's answer to the proxy's `Connection: close`, not passed on (the client's connection stays open)."""


class _ResetError(Exception):
    """End the client connection with a reset."""


@dataclass
class _Message:
    """An HTTP request or response: its first line, header lines (as received) and raw body (chunked kept)."""

    first: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes = b""
    until_close: bool = False
    """A response framed by the end of the connection (no length, not chunked)."""

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name:
                return value.strip()
        return None

    def head(self, drop: Sequence[bytes] = (), add: Sequence[tuple[bytes, bytes]] = ()) -> bytes:
        lines = [self.first] + [k + b":" + v for k, v in self.headers if k.lower() not in drop]
        lines += [k + b": " + v for k, v in add]
        return b"\r\n".join(lines) + b"\r\n\r\n"


def _parse_head(raw: bytes) -> _Message:
    lines = raw[:-4].split(b"\r\n")
    headers = []
    for line in lines[1:]:
        key, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"malformed header line {line[:80]!r}")
        headers.append((key, value))
    return _Message(lines[0], headers)


async def _read_body(
    reader: asyncio.StreamReader, msg: _Message, max_body: int, seconds: float, *, response: bool
) -> None:
    """Read `msg`'s body as framed (Content-Length, chunked kept raw, or until close for a response); every read
    times out after `seconds`."""

    async def read(coro: Awaitable[bytes]) -> bytes:
        return await asyncio.wait_for(coro, seconds)

    if (msg.header(b"transfer-encoding") or b"").lower().endswith(b"chunked"):
        parts = []
        size_total = 0
        while True:
            line = await read(reader.readuntil(b"\r\n"))
            parts.append(line)
            size = int(line.split(b";")[0].strip(), 16)
            size_total += size
            if size_total > max_body:
                raise OverflowError
            if size == 0:
                while True:  # trailers, then the empty line
                    trailer = await read(reader.readuntil(b"\r\n"))
                    parts.append(trailer)
                    if trailer == b"\r\n":
                        break
                break
            parts.append(await read(reader.readexactly(size + 2)))
        msg.body = b"".join(parts)
        return
    length = msg.header(b"content-length")
    if length is not None:
        n = int(length)
        if n > max_body:
            raise OverflowError
        msg.body = await read(reader.readexactly(n)) if n else b""
        return
    if response:
        msg.until_close = True
        msg.body = await read(reader.read(max_body + 1))
        if len(msg.body) > max_body:
            raise OverflowError


def _error(status: int, reason: str, code: str, message: str) -> bytes:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
        "<RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
        "x-amz-request-id: faultproxy\r\n\r\n"
    ).encode()
    return head + body


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass
class FaultProxy:
    upstream: str
    """The server's URL, e.g. http://127.0.0.1:8333."""
    rate: float = 0.0
    seed: int | None = None
    """None: a random seed (printed, and in repr)."""
    kinds: Sequence[str] = KINDS
    latency: tuple[float, float] = (0.05, 0.4)
    max_connections: int = 64
    max_body: int = 512 * 1024 * 1024
    timeout: float = 60.0
    down: bool = False
    """An outage: every request is reset while True."""
    deny_writes_under: str | None = None
    """A path prefix ("/bucket/key-prefix") under which every write is refused with 403 AccessDenied."""
    injected: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    port: int = 0

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(KINDS)
        if unknown or not self.kinds:
            raise ValueError(f"fault kinds must be among {KINDS}, got {list(self.kinds)}")
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be within [0, 1], got {self.rate}")
        if self.seed is None:
            self.seed = random.SystemRandom().randrange(2**32)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()
        target = urlsplit(self.upstream)
        if target.scheme != "http" or not target.hostname or not target.port:
            raise ValueError(f"upstream must be http://host:port, got {self.upstream}")
        self._target = (target.hostname, target.port)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None
        self._slots: asyncio.Semaphore | None = None

    def __repr__(self) -> str:
        return (
            f"FaultProxy({self.endpoint} -> {self.upstream}, rate={self.rate}, seed={self.seed}, "
            f"kinds={list(self.kinds)}, requests={self.requests}, injected={dict(self.injected)})"
        )

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ----- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> FaultProxy:
        ready = threading.Event()
        failed: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._slots = asyncio.Semaphore(self.max_connections)
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._client, "127.0.0.1", 0, limit=HEAD_LIMIT)
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except BaseException as err:
                failed.append(err)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=serve, name="faultproxy", daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise RuntimeError("the fault proxy did not start")
        if failed:
            raise failed[0]
        print(f"fault proxy: {self!r}", flush=True)
        return self

    def stop(self) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None or self._thread is None:
            return

        async def close() -> None:
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        with contextlib.suppress(RuntimeError):
            asyncio.run_coroutine_threadsafe(close(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Every request is reset inside the block."""
        self.down = True
        try:
            yield
        finally:
            self.down = False

    # ----- one request ------------------------------------------------------------------------------------
    def _denied(self, request: _Message) -> bool:
        if self.deny_writes_under is None:
            return False
        method, target = request.first.split(b" ")[:2]
        if method.upper() not in (b"PUT", b"POST", b"DELETE") or not target.startswith(self.deny_writes_under.encode()):
            return False
        with self._lock:
            self.requests += 1
            self.injected["denied"] += 1
        return True

    def _draw(self) -> str | None:
        with self._lock:
            self.requests += 1
            if self.down:
                self.injected["outage"] += 1
                return "outage"
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(list(self.kinds))
            self.injected[kind] += 1
            return kind

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._slots is not None
        async with self._slots:
            try:
                while await self._one(reader, writer):
                    pass
            except _ResetError:
                _reset(writer)
                return
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError):
                pass
            except OverflowError:
                with contextlib.suppress(OSError):
                    writer.write(_error(413, "Payload Too Large", "EntityTooLarge", "the fault proxy's limit"))
                    await writer.drain()
            except asyncio.CancelledError:
                _reset(writer)
                raise
            with contextlib.suppress(OSError):
                writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Serve one request; False when the connection is to be closed."""
        try:
            raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.timeout)
        except asyncio.IncompleteReadError:
            return False  # the client closed its keep-alive connection
        request = _parse_head(raw)
        if (request.header(b"expect") or b"").lower() == b"100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        await _read_body(reader, request, self.max_body, self.timeout, response=False)
        if self._denied(request):
            writer.write(_error(403, "Forbidden", "AccessDenied", "writes under this prefix are denied"))
            await writer.drain()
            return True
        kind = self._draw()
        if kind in ("reset", "outage"):
            raise _ResetError
        if kind == "error500":
            writer.write(_error(500, "Internal Server Error", "InternalError", "injected by the fault proxy"))
            await writer.drain()
            return True
        if kind == "slowdown":
            writer.write(_error(503, "Slow Down", "SlowDown", "Please reduce your request rate."))
            await writer.drain()
            return True
        if kind == "latency":
            await asyncio.sleep(self._rng.uniform(*self.latency))
        response = await self._forward(request)
        method = request.first.split(b" ", 1)[0].upper()
        if kind == "truncate":
            if len(response.body) >= 2 and method != b"HEAD":
                writer.write(response.head(drop=HOP) + response.body[: len(response.body) // 2])
                await writer.drain()
            raise _ResetError
        writer.write(response.head(drop=HOP) + (b"" if method == b"HEAD" else response.body))
        await writer.drain()
        close = (request.header(b"connection") or b"").lower() == b"close" or response.until_close
        return not close

    async def _forward(self, request: _Message) -> _Message:
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(*self._target, limit=HEAD_LIMIT), self.timeout
        )
        try:
            add = [] if request.header(b"connection") is not None else [(b"Connection", b"close")]
            up_writer.write(request.head(drop=(b"expect",), add=add) + request.body)
            await up_writer.drain()
            while True:
                raw = await asyncio.wait_for(up_reader.readuntil(b"\r\n\r\n"), self.timeout)
                response = _parse_head(raw)
                status = int(response.first.split(b" ")[1])
                if status != 100:
                    break
            method = request.first.split(b" ", 1)[0].upper()
            if method != b"HEAD" and status not in NO_BODY_STATUS:
                await _read_body(up_reader, response, self.max_body, self.timeout, response=True)
            return response
        finally:
            up_writer.close()
            with contextlib.suppress(OSError):
                await up_writer.wait_closed()
