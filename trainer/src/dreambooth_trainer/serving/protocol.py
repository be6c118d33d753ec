"""The OpenAI Images API as the server speaks it: request, response and error types (pydantic), as vLLM's
`protocol.py` does for its OpenAI-compatible server.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `model`, `n`, `size`, `response_format`, `user`) plus
our extensions, which the official client sends as `extra_body` (`negative_prompt`, `num_inference_steps`,
`guidance_scale`, `seed`, `scheduler`, `adapters`). Errors are OpenAI's envelope
`{"error": {"message", "type", "param", "code"}}` with the status codes the official client maps to its exception
classes (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 503
InternalServerError; 413 is an APIStatusError).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

from dreambooth_api.common import DNS_LABEL_PATTERN
from dreambooth_api.config import Sampler

MAX_BODY_BYTES: Final = 64 * 1024
"""Request bodies above this get 413."""
MAX_PROMPT_CHARS: Final = 8000
"""A hard bound on prompt length in characters; the token limit (`maxPromptTokens`) is checked after parsing."""
MAX_SEED: Final = 2**32 - 1
SIZE_PATTERN: Final = r"^(auto|[0-9]{1,5}x[0-9]{1,5})$"


class ErrorType:
    """OpenAI's error `type` values that the server uses."""

    INVALID_REQUEST: Final = "invalid_request_error"
    AUTHENTICATION: Final = "authentication_error"
    NOT_FOUND: Final = "not_found_error"
    RATE_LIMIT: Final = "rate_limit_error"
    SERVER: Final = "server_error"
    UNAVAILABLE: Final = "service_unavailable_error"


class ApiError(Exception):
    """An error answered in OpenAI's envelope; `retry_after` (seconds) adds a Retry-After header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or default_type(status)
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def body(self) -> ErrorResponse:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code))

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}


def default_type(status: int) -> str:
    types: dict[int, str] = {
        HTTPStatus.UNAUTHORIZED: ErrorType.AUTHENTICATION,
        HTTPStatus.NOT_FOUND: ErrorType.NOT_FOUND,
        HTTPStatus.TOO_MANY_REQUESTS: ErrorType.RATE_LIMIT,
        HTTPStatus.SERVICE_UNAVAILABLE: ErrorType.UNAVAILABLE,
    }
    return types.get(int(status), ErrorType.SERVER if status >= 500 else ErrorType.INVALID_REQUEST)


def limit_error(param: str, value: object, limit_name: str, limit: object) -> ApiError:
    """A 400 naming the server limit a request exceeds."""
    return ApiError(
        HTTPStatus.BAD_REQUEST,
        f"{param}={value} exceeds the server's limit {limit_name}={limit}",
        param=param,
        code="limit_exceeded",
    )


class ErrorDetail(BaseModel):
    message: str
    """What went wrong, for a person."""
    type: str
    """The error class: invalid_request_error, authentication_error, not_found_error, rate_limit_error,
    service_unavailable_error or server_error."""
    param: str | None = None
    """The request field at fault, if one is."""
    code: str | None = None
    """A machine-readable code, for example limit_exceeded, model_not_found, queue_full, not_ready."""


class ErrorResponse(BaseModel):
    """OpenAI's error envelope."""

    error: ErrorDetail


AdapterName = Annotated[str, Field(pattern=DNS_LABEL_PATTERN, min_length=1, max_length=63)]
AdapterWeight = Annotated[float, Field(ge=-10.0, le=10.0, allow_inf_nan=False)]


class ImageGenerationRequest(BaseModel):
    """The body of `POST /v1/images/generations`: OpenAI's fields, then our extensions (`extra_body`)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"prompt": "a photo of sks dog on the beach", "model": "dog", "n": 2, "size": "512x512", "seed": 7}
            ]
        },
    )

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    """What to draw; at most the server's maxPromptTokens tokens."""
    model: str | None = Field(default=None, max_length=253)
    """The base model's name or a subject's (see GET /v1/models); the base model when unset."""
    n: int | None = Field(default=1, ge=1)
    """How many images, at most the server's maxImagesPerRequest."""
    size: str | None = Field(default=None, pattern=SIZE_PATTERN)
    """WIDTHxHEIGHT in pixels, each a multiple of 8 up to the server's maxResolution; `auto` or unset: the model's
    native (training) resolution."""
    response_format: Literal["b64_json", "url"] | None = "b64_json"
    """Only b64_json (url is not supported and gets a 400)."""
    user: str | None = Field(default=None, max_length=256)
    """An end-user identifier; accepted and logged with nothing else."""
    negative_prompt: str | None = Field(default=None, max_length=MAX_PROMPT_CHARS)
    """Extension: what not to draw (the unconditional prompt of classifier-free guidance)."""
    num_inference_steps: int | None = Field(default=None, ge=1)
    """Extension: sampling steps, at most the server's maxSteps (its defaultSteps when unset)."""
    guidance_scale: float | None = Field(default=None, ge=0.0, le=50.0, allow_inf_nan=False)
    """Extension: classifier-free guidance scale (the server's defaultGuidanceScale when unset)."""
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    """Extension: image i uses seed + i, alone or batched with other requests (random when unset)."""
    scheduler: Sampler | None = None
    """Extension: the sampler (the server's defaultScheduler when unset)."""
    adapters: dict[AdapterName, AdapterWeight] | None = Field(default=None, max_length=16)
    """Extension: LoRA adapters (subjects) by name -> weight, to mix them. Unset: the subject named by `model` at its
    weight, or for the base model the configured adapters at theirs."""


class ImageData(BaseModel):
    b64_json: str
    """The PNG, base64-encoded."""
    seed: int
    """Extension: the seed that gives this image again (as a request's `seed` with n=1)."""


class ImagesResponse(BaseModel):
    created: int
    """Unix time (seconds) of the answer."""
    data: list[ImageData]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "dreambooth"
    root: str | None = None
    """Extension: where its weights are (the model URI, or the subject's LoRA URI)."""
    parent: str | None = None
    """Extension: for a subject, the base model it is applied to."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(BaseModel):
    status: Literal["loading", "warming_up", "ready", "draining", "failed"]
    error: str | None = None
