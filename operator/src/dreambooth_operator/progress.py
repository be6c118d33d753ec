"""Polling rank 0's ``/progress`` (docs/contracts.md), with a global limit on requests in flight.

Each active job is polled at most once per interval (10-15 s by default); many jobs share one aiohttp
session and one semaphore, so a thousand jobs never open a thousand connections at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

import aiohttp

from dreambooth_operator.settings import TRAINER_METRICS_PORT


def progress_url(pod_ip: str, port: int = TRAINER_METRICS_PORT) -> str:
    host = f"[{pod_ip}]" if ":" in pod_ip else pod_ip
    return f"http://{host}:{port}/progress"


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

    async def fetch(self, key: tuple[str, str], pod_ip: str, port: int | None = None) -> Mapping[str, Any]:
        """GET /progress; raises aiohttp.ClientError / TimeoutError / ValueError on failure."""
        self._last[key] = time.monotonic()
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        async with self._semaphore, self._session.get(progress_url(pod_ip, port or self.port)) as response:
            response.raise_for_status()
            doc = await response.json(content_type=None)
        if not isinstance(doc, dict):
            raise ValueError("/progress did not return a JSON object")
        return doc

    def forget(self, key: tuple[str, str]) -> None:
        self._last.pop(key, None)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
