"""What the sampling server reads: its config document (`env.SERVE_CONFIG`) and the body of POST /generate, plus
the small HTTP rules (bearer token, Content-Length, which status a failed generation gets)."""

from __future__ import annotations

import hmac
import json
import os
from http import HTTPStatus
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import Field, ValidationError

from dreambooth_api import env
from dreambooth_api.config import Model, Sampler
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.serving import ServeConfig

MAX_BODY_BYTES = 64 * 1024


class GenerateRequest(Model):
    """The body of POST /generate."""

    prompt: str = Field(min_length=1, max_length=1000)
    negative_prompt: str | None = Field(default=None, max_length=1000)
    steps: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    width: int | None = Field(default=None, ge=8, multiple_of=8)
    height: int | None = Field(default=None, ge=8, multiple_of=8)
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0)
    num_images: int = Field(default=1, ge=1)
    scheduler: Sampler | None = None
    adapters: dict[str, Annotated[float, Field(ge=-10.0, le=10.0, allow_inf_nan=False)]] | None = None
    format: str = Field(default="png", pattern=r"^(png|json)$")


def load_serve_config(raw: str | None = None) -> ServeConfig:
    text = raw if raw is not None else os.environ.get(env.SERVE_CONFIG, "")
    if not text.strip():
        raise InvalidInputError(f"no server config: set {env.SERVE_CONFIG}")
    stripped = text.strip()
    if not stripped.startswith("{") and Path(stripped).is_file():
        text = Path(stripped).read_text()
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
        config = ServeConfig.model_validate(data)
    except (json.JSONDecodeError, yaml.YAMLError, ValidationError) as err:
        raise InvalidInputError(f"invalid server config: {err}") from err
    if config.model_uri is None and config.base_model is None:
        raise InvalidInputError("server config needs modelUri or baseModel")
    return config


def error_status(err: BaseException) -> HTTPStatus:
    """503 when the GPU ran out of memory (the request may succeed later), else 500."""
    if type(err).__name__ == "OutOfMemoryError" or "out of memory" in str(err).lower():
        return HTTPStatus.SERVICE_UNAVAILABLE
    return HTTPStatus.INTERNAL_SERVER_ERROR


def content_length(value: str | None) -> int | None:
    """The request body's length (0 when absent), or None when the header is not a non-negative integer."""
    if value is None:
        return 0
    text = value.strip()
    return int(text) if text.isdigit() else None


def token_matches(header: str | None, token: str) -> bool:
    """Constant-time check of an `Authorization: Bearer <token>` header."""
    return hmac.compare_digest((header or "").encode(), f"Bearer {token}".encode())
