"""Polling rank 0's ``/progress`` (docs/contracts.md), with a global limit on requests in flight.

Each active job is polled at most once per interval (10-15 s by default); many jobs share one aiohttp
session and one semaphore, so a thousand jobs never open a thousand connections at once. The body is read
through `dreambooth_api.progress.parse_progress`, and never more than MAX_PROGRESS_BYTES of it: a pod runs a
user-chosen image, so its answer may be anything.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from dreambooth_api.env import TRAINER_METRICS_PORT
from dreambooth_api.progress import MAX_PROGRESS_BYTES, ProgressDocument, ProgressError, parse_progress

READ_CHUNK_BYTES = 8192


def progress_url(pod_ip: str, port: int = TRAINER_METRICS_PORT) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}/progress"


async def read_bounded(response: aiohttp.ClientResponse, limit: int = MAX_PROGRESS_BYTES) -> bytes:
    """The response body, refused (ProgressError) as soon as it is known to be over `limit` bytes: by its
    Content-Length, or while reading it in chunks (a chunked or lying answer is never buffered beyond the limit)."""
    if response.content_length is not None and response.content_length > limit:
        raise ProgressError(f"/progress body is over {limit} bytes (Content-Length {response.content_length})")
    body = bytearray()
    async for chunk in response.content.iter_chunked(READ_CHUNK_BYTES):
        body += chunk
        if len(body) > limit:
            raise ProgressError(f"/progress body is over {limit} bytes")
    return bytes(body)


class ProgressPoller:
    def __init__(
        self, concurrency: int, timeout_seconds: float, interval_seconds: float, port: int = TRAINER_METRICS_PORT
    ) -> None:
        self.port = port
        """The trainer's metrics port (the pods' named port; another value only in tests)."""
        self._semaphore = asyncio.Semaphore(concurrency)
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._interval = interval_seconds
        self._session: aiohttp.ClientSession | None = None
        self._last: dict[tuple[str, str], float] = {}

    def due(self, key: tuple[str, str]) -> bool:
        """Whether the job's last poll is older than the interval."""
        return time.monotonic() - self._last.get(key, float("-inf")) >= self._interval

    async def fetch(self, key: tuple[str, str], pod_ip: str, port: int | None = None) -> ProgressDocument:
        """GET /progress; raises aiohttp.ClientError / TimeoutError, or ProgressError for an unusable body."""
        self._last[key] = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._semaphore, self._session.get(progress_url(pod_ip, port or self.port)) as response:
            response.raise_for_status()
            body = await read_bounded(response)
        return parse_progress(body)

    def forget(self, key: tuple[str, str]) -> None:
        self._last.pop(key, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
