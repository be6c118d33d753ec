"""The HTTP layer: thin FastAPI routes over `ImageService`, OpenAI's error envelope for every failure, and two pure
ASGI middlewares that act before a body is read (the bearer token, the body size) plus the request metrics.

Routes: `POST /v1/images/generations`, `GET /v1/models`, `GET /v1/models/{model}` (bearer token when configured);
`GET /healthz` (liveness, for a startup and a liveness probe: 503 until the model is loaded and warmed up, then 200,
draining included; 500 after a failed load), `GET /readyz` (readiness: 200 once the weights are loaded and a warm-up
generation ran, 503 while loading and draining), `GET /metrics`, and the generated `GET /openapi.json` (`/docs`
renders it).
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Annotated, Any, Final

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from dreambooth_trainer.serving.images import ImageService, Lifecycle, Phase
from dreambooth_trainer.serving.metrics import LATENCY, REQUESTS
from dreambooth_trainer.serving.protocol import (
    MAX_BODY_BYTES,
    ApiError,
    ErrorResponse,
    Health,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

GENERATIONS: Final = "/v1/images/generations"
API_PREFIX: Final = "/v1/"
API_KEY_HEADER: Final = "api-key"
"""The token may also come in this header (Azure OpenAI's name): the Kubernetes API server's service proxy, which
`dreambooth generate` uses, removes the Authorization header."""

ERRORS: Final = {
    HTTPStatus.BAD_REQUEST: "invalid request: a field, or over a server limit (the message names it)",
    HTTPStatus.UNAUTHORIZED: "missing or wrong bearer token",
    HTTPStatus.NOT_FOUND: "unknown model or adapter",
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: f"request body over {MAX_BODY_BYTES} bytes",
    HTTPStatus.TOO_MANY_REQUESTS: "the queue is full: retry after Retry-After seconds",
    HTTPStatus.INTERNAL_SERVER_ERROR: "generation failed",
    HTTPStatus.SERVICE_UNAVAILABLE: "not ready, draining, past the request's deadline, or out of GPU memory",
}


def error_responses(*codes: HTTPStatus) -> dict[int | str, dict[str, Any]]:
    return {int(c): {"model": ErrorResponse, "description": ERRORS[c]} for c in codes}


def json_error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body().model_dump(), status_code=err.status, headers=err.headers())


async def send_error(send: Send, err: ApiError) -> None:
    """An error answer from a pure ASGI middleware (before the app ran)."""
    body = json.dumps(err.body().model_dump()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers().items()]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class PayloadTooLargeError(StarletteHTTPException):
    """Raised while reading a body (chunked, or longer than its Content-Length said); FastAPI re-raises
    HTTPExceptions from the body read, where it would turn other errors into a 400."""

    def __init__(self) -> None:
        super().__init__(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body exceeds {MAX_BODY_BYTES} bytes")


class GuardMiddleware:
    """Before the body is read: the token for /v1/ paths (401), and the body size (413 on Content-Length, or as it
    streams in)."""

    def __init__(self, app: ASGIApp, token: str | None, limit: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.token = token.encode() if token else None
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.token is not None and str(scope.get("path", "")).startswith(API_PREFIX):
            given = _token_of(headers)
            if given is None or not hmac.compare_digest(given.encode(), self.token):
                await send_error(
                    send,
                    ApiError(
                        HTTPStatus.UNAUTHORIZED,
                        "missing or wrong token: send Authorization: Bearer <token> (or api-key: <token>)",
                        code="invalid_api_key",
                    ),
                )
                return
        length = headers.get("content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > self.limit):
            status = HTTPStatus.BAD_REQUEST if not length.strip().isdigit() else HTTPStatus.REQUEST_ENTITY_TOO_LARGE
            message = "Content-Length must be a non-negative integer"
            if status == HTTPStatus.REQUEST_ENTITY_TOO_LARGE:
                message = f"the request body ({length} bytes) exceeds {self.limit} bytes"
            await send_error(send, ApiError(status, message, code="request_too_large"))
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise PayloadTooLargeError
            return message

        await self.app(scope, limited, send)


def _token_of(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = headers.get(API_KEY_HEADER, "").strip()
    return key or None


class MetricsMiddleware:
    """Counts generation requests by status code and observes their latency (auth and size refusals included)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") != GENERATIONS:
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 500

        async def recording(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                REQUESTS.labels(code=str(status)).inc()  # before the answer, so that a client sees it counted
            await send(message)

        try:
            await self.app(scope, receive, recording)
        except Exception:
            REQUESTS.labels(code="500").inc()
            raise
        finally:
            LATENCY.observe(time.monotonic() - started)


async def disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body was read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _documented_only() -> None:
    """Documents the security schemes; `GuardMiddleware` checks the token before the body is read."""


bearer = HTTPBearer(auto_error=False, description="the InferenceService's token (spec.auth), when it has one")
api_key = APIKeyHeader(name=API_KEY_HEADER, auto_error=False, description="the same token, in this header")


def _security(
    _b: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    _k: Annotated[str | None, Depends(api_key)],
) -> None:
    _documented_only()


def create_app(service: ImageService, lifecycle: Lifecycle, token: str | None) -> FastAPI:
    app = FastAPI(
        title="dreambooth-serve",
        summary="OpenAI-compatible image generation for DreamBooth models and their LoRA subjects",
        version="1",
        openapi_url="/openapi.json",
        docs_url="/docs",
        redoc_url=None,
    )
    app.add_middleware(GuardMiddleware, token=token)
    app.add_middleware(MetricsMiddleware)
    _handlers(app)
    secured = [Depends(_security)]

    @app.post(
        GENERATIONS,
        response_model=ImagesResponse,
        responses=error_responses(*ERRORS),
        dependencies=secured,
        summary="Create images (OpenAI Images API)",
    )
    async def create_images(body: ImageGenerationRequest, request: Request) -> ImagesResponse:
        return await service.generate(body, lambda: disconnected(request))

    @app.get(
        "/v1/models",
        response_model=ModelList,
        responses=error_responses(HTTPStatus.UNAUTHORIZED),
        dependencies=secured,
        summary="The base model and every subject the server can load",
    )
    async def list_models() -> ModelList:
        return await service.models()

    @app.get(
        "/v1/models/{model}",
        response_model=ModelCard,
        responses=error_responses(HTTPStatus.BAD_REQUEST, HTTPStatus.UNAUTHORIZED, HTTPStatus.NOT_FOUND),
        dependencies=secured,
        summary="One model or subject",
    )
    async def get_model(model: str) -> ModelCard:
        return await service.model(model)

    @app.get(
        "/healthz",
        response_model=Health,
        responses={
            500: {"model": Health, "description": "the model failed to load (the process exits)"},
            503: {"model": Health, "description": "still loading or warming up (a startup probe waits for 200)"},
        },
        summary="Liveness: the model is loaded (draining included)",
    )
    async def healthz() -> JSONResponse:
        codes = {Phase.FAILED: 500, Phase.LOADING: 503, Phase.WARMING_UP: 503}
        return JSONResponse(_health(lifecycle), status_code=codes.get(lifecycle.phase, 200))

    @app.get(
        "/readyz",
        response_model=Health,
        responses={503: {"model": Health, "description": "loading, warming up, draining or failed"}},
        summary="Readiness: the weights are loaded and a warm-up generation ran",
    )
    async def readyz() -> JSONResponse:
        code = 200 if lifecycle.phase == Phase.READY else 503
        return JSONResponse(_health(lifecycle), status_code=code)

    @app.get(
        "/metrics",
        response_class=Response,
        responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format"}},
        summary="Prometheus metrics",
    )
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    _without_422(app)
    return app


def _health(lifecycle: Lifecycle) -> dict[str, Any]:
    return Health(status=lifecycle.phase, error=lifecycle.error or None).model_dump(exclude_none=True)


def _handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, err: Exception) -> Response:
        assert isinstance(err, ApiError)
        return json_error(err)

    async def invalid(_request: Request, err: Exception) -> Response:
        assert isinstance(err, RequestValidationError)
        problems, param = [], None
        for e in err.errors():
            loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "path", "query")]
            where = ".".join(loc)
            param = param or where or None
            problems.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
        message = "; ".join(problems)[:2000] or "invalid request"
        return json_error(ApiError(HTTPStatus.BAD_REQUEST, message, param=param, code="invalid_value"))

    async def http_error(_request: Request, err: Exception) -> Response:
        assert isinstance(err, StarletteHTTPException)
        code = "request_too_large" if err.status_code == HTTPStatus.REQUEST_ENTITY_TOO_LARGE else None
        return json_error(ApiError(err.status_code, str(err.detail), code=code))

    async def unexpected(_request: Request, err: Exception) -> Response:
        return json_error(ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}"))

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)


def _without_422(app: FastAPI) -> None:
    """The served OpenAPI document as the server behaves: validation errors are 400s in OpenAI's envelope (FastAPI
    documents 422 for them)."""
    plain = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = plain()
            for path in doc.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
