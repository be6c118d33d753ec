"""The HTTP side of `generate`: the OpenAI Images request to an InferenceService, through the API server's service
proxy or straight to a URL, and the answer's PNGs written to a folder."""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import urllib3
from kubernetes.client.rest import ApiException

from dreambooth_cli import kube
from dreambooth_cli.errors import ApiError, CliError, ExitStatus, InputError

GENERATIONS_PATH = "/v1/images/generations"
"""The sampling server's OpenAI Images endpoint."""
SERVICE_PORT_NAME = "http"
"""The port name of an InferenceService's Service."""
GENERATE_TIMEOUT_SECONDS = 600.0
RETRY_STATUSES = (429, 503)
"""Answers worth waiting out (a full queue, a server still loading): retried after their Retry-After."""


@dataclass(frozen=True)
class GeneratedImage:
    """A PNG that `generate` wrote, and the seed that gives it again (with n=1)."""

    path: Path
    seed: int | None


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes


def post_through_api_server(
    target: kube.Target, name: str, body: Mapping[str, Any], token: str | None, deadline: float
) -> Answer:
    """POST through the API server's proxy to the Service's `http` port. The API server removes the
    Authorization header it authenticated with, so the token travels as `api-key` (the server accepts both)."""
    path = f"/api/v1/namespaces/{target.namespace}/services/{name}:{SERVICE_PORT_NAME}/proxy{GENERATIONS_PATH}"
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["api-key"] = token
    try:
        response = target.api_client.call_api(
            path,
            "POST",
            header_params=headers,
            body=dict(body),
            auth_settings=["BearerToken"],
            _preload_content=False,
            _return_http_data_only=True,
            _request_timeout=max(1.0, deadline - time.monotonic()),
        )
        return Answer(int(response.status), dict(response.headers), bytes(response.data))
    except ApiException as err:
        return Answer(int(err.status or 0), dict(err.headers or {}), _bytes(err.body))
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise ApiError(f"no cluster reachable at {target.host}: {reason}", ExitStatus.NO_CLUSTER, None) from err


def post_direct(url: str, body: Mapping[str, Any], token: str | None, deadline: float) -> Answer:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    read = max(1.0, deadline - time.monotonic())
    try:
        response = urllib3.request(
            "POST",
            url.rstrip("/") + GENERATIONS_PATH,
            body=json.dumps(body).encode(),
            headers=headers,
            timeout=urllib3.Timeout(connect=10.0, read=read),
            retries=False,
        )
    except urllib3.exceptions.HTTPError as err:
        raise CliError(f"no server reachable at {url}: {err}", ExitStatus.ERROR) from err
    return Answer(response.status, dict(response.headers), response.data)


def _bytes(body: Any) -> bytes:
    if body is None:
        return b""
    return body if isinstance(body, bytes) else str(body).encode()


def error_message(answer: Answer) -> str:
    """OpenAI's `error.message`, a Kubernetes Status' `message` (the API server's own refusals), or the status."""
    try:
        doc = json.loads(answer.body)
    except ValueError:
        doc = None
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        if doc.get("message"):
            return str(doc["message"])
    text = answer.body.decode(errors="replace").strip()
    return f"HTTP {answer.status}" + (f": {text[:300]}" if text else "")


def retry_after(headers: Mapping[str, str]) -> float:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), "")
    try:
        return min(30.0, max(1.0, float(value)))
    except ValueError:
        return 2.0


def generate_error(name: str, status: int, message: str) -> CliError:
    if status == 400:
        return InputError(f"{name}: {message}")
    if status == 404:
        return CliError(f"{name}: {message}", ExitStatus.NOT_FOUND)
    if status == 401:
        return CliError(f"{name}: {message} (pass --token)", ExitStatus.ERROR)
    return CliError(f"{name}: {message}", ExitStatus.ERROR)


def write_images(body: bytes, folder: Path, stem: str) -> list[GeneratedImage]:
    try:
        data = json.loads(body)["data"]
        images = [(base64.b64decode(item["b64_json"]), item.get("seed")) for item in data]
    except (ValueError, KeyError, TypeError, binascii.Error) as err:
        raise CliError(f"the server's answer is not an OpenAI images response: {err}") from err
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (png, seed) in enumerate(images):
        path = folder / f"{stem}-{seed if isinstance(seed, int) else index}.png"
        path.write_bytes(png)
        written.append(GeneratedImage(path, seed if isinstance(seed, int) else None))
    return written
