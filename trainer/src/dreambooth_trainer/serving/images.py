"""Between the routes and the engine (vLLM's `OpenAIServing*` layer): an OpenAI request checked against the server's
limits, its model and adapters resolved to subjects, turned into an engine `Job`, awaited (deadline, client
disconnect) and answered as OpenAI's response; every failure is an `ApiError` in OpenAI's envelope."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

from starlette.concurrency import run_in_threadpool

from dreambooth_api.serving import DEFAULT_MODEL_NAME, ServeConfig, ServerDefaults
from dreambooth_trainer.serving.adapters import SubjectLoadError
from dreambooth_trainer.serving.engine import (
    BatchKey,
    CancelledJobError,
    DeadlineExceededError,
    Engine,
    GenerationError,
    Job,
    QueueFullError,
)
from dreambooth_trainer.serving.metrics import INFLIGHT, READY
from dreambooth_trainer.serving.protocol import (
    MAX_SEED,
    ApiError,
    ImageData,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    limit_error,
)
from dreambooth_trainer.serving.runner import ModelRunner, Sample, Sampling
from dreambooth_trainer.serving.subjects import Subject, SubjectCatalog

NOT_READY_RETRY_SECONDS: Final = 2


class Phase:
    LOADING: Final = "loading"
    WARMING_UP: Final = "warming_up"
    READY: Final = "ready"
    DRAINING: Final = "draining"
    FAILED: Final = "failed"


@dataclass
class Lifecycle:
    """Where the server is: loading -> warming_up -> ready -> draining, or failed (with `error`)."""

    phase: str = Phase.LOADING
    error: str = ""

    def set(self, phase: str, error: str = "") -> None:
        self.phase = phase
        self.error = error
        READY.set(1 if phase == Phase.READY else 0)


@dataclass(frozen=True)
class Limits:
    """`ServerLimits` with the server's defaults filled in."""

    max_images: int
    max_steps: int
    max_resolution: int
    max_prompt_tokens: int | None
    max_loaded_adapters: int
    timeout: float


class ImageService:
    def __init__(
        self,
        config: ServeConfig,
        runner: ModelRunner,
        catalog: SubjectCatalog,
        engine: Engine,
        lifecycle: Lifecycle,
    ) -> None:
        self.config = config
        self.runner = runner
        self.catalog = catalog
        self.engine = engine
        self.lifecycle = lifecycle
        self.model_name = config.model_name or DEFAULT_MODEL_NAME
        self.created = int(time.time())
        s = config.server
        self.limits = Limits(
            max_images=s.max_images_per_request,
            max_steps=s.max_steps,
            max_resolution=s.max_resolution,
            max_prompt_tokens=s.max_prompt_tokens,
            max_loaded_adapters=s.max_loaded_adapters or ServerDefaults.MAX_LOADED_ADAPTERS,
            timeout=float(s.request_timeout_seconds or ServerDefaults.REQUEST_TIMEOUT_SECONDS),
        )

    # ----- POST /v1/images/generations ---------------------------------------------------------------
    async def generate(
        self, req: ImageGenerationRequest, disconnected: Callable[[], Awaitable[None]]
    ) -> ImagesResponse:
        """Answer one request (`disconnected` returns when the client goes away)."""
        INFLIGHT.inc()
        try:
            self.check_ready()
            deadline = time.monotonic() + self.limits.timeout
            job = await self.plan(req, deadline)
            try:
                future = self.engine.submit(job)
            except QueueFullError as err:
                raise ApiError(
                    HTTPStatus.TOO_MANY_REQUESTS,
                    f"the server's queue is full ({self.engine.max_queue} requests wait);"
                    f" retry after {err.retry_after} s",
                    code="queue_full",
                    retry_after=err.retry_after,
                ) from err
            images = await self._wait(job, future, disconnected)
            pngs = await run_in_threadpool(_encode, images)
            first = job.samples[0].seed
            return ImagesResponse(
                created=int(time.time()),
                data=[ImageData(b64_json=png, seed=first + i) for i, png in enumerate(pngs)],
            )
        finally:
            INFLIGHT.dec()

    def check_ready(self) -> None:
        phase = self.lifecycle.phase
        if phase != Phase.READY:
            what = {Phase.DRAINING: "the server is shutting down", Phase.FAILED: "the model failed to load"}
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                what.get(phase, f"the model is not ready yet ({phase})"),
                code="draining" if phase == Phase.DRAINING else "not_ready",
                retry_after=NOT_READY_RETRY_SECONDS,
            )

    async def plan(self, req: ImageGenerationRequest, deadline: float) -> Job:
        """The engine job of a request; raises ApiError (400 over a limit, 404 unknown model or adapter)."""
        lim, server = self.limits, self.config.server
        if req.response_format == "url":
            raise ApiError(
                HTTPStatus.BAD_REQUEST,
                "response_format url is not supported: use b64_json",
                param="response_format",
                code="unsupported_value",
            )
        n = req.n if req.n is not None else 1
        if n > lim.max_images:
            raise limit_error("n", n, "maxImagesPerRequest", lim.max_images)
        width, height = self._size(req.size)
        steps = req.num_inference_steps if req.num_inference_steps is not None else server.default_steps
        if steps > lim.max_steps:
            raise limit_error("num_inference_steps", steps, "maxSteps", lim.max_steps)
        token_limit = lim.max_prompt_tokens or self.runner.max_tokens
        for param, text in (("prompt", req.prompt), ("negative_prompt", req.negative_prompt)):
            if text:
                tokens = self.runner.count_tokens(text)
                if tokens > token_limit:
                    raise limit_error(f"{param} tokens", tokens, "maxPromptTokens", token_limit)
        subjects = await run_in_threadpool(self._subjects, req)
        if len(subjects) > lim.max_loaded_adapters:
            raise limit_error("adapters", len(subjects), "maxLoadedAdapters", lim.max_loaded_adapters)
        guidance = req.guidance_scale if req.guidance_scale is not None else server.default_guidance_scale
        sampling = Sampling(width, height, steps, req.scheduler or server.default_scheduler, float(guidance))
        key = BatchKey(sampling, tuple(sorted((s.name, w) for s, w in subjects)))
        seed = req.seed if req.seed is not None else random.SystemRandom().randrange(MAX_SEED - n + 1)
        negative = req.negative_prompt or ""
        samples = [Sample(req.prompt, negative, seed + i) for i in range(n)]
        return Job(key, tuple(sorted(subjects, key=lambda sw: sw[0].name)), samples, deadline)

    def _size(self, size: str | None) -> tuple[int, int]:
        max_res = self.limits.max_resolution
        if size is None or size == "auto":
            native = self.runner.native_size
            if native > max_res:
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    f"the model's native size {native}x{native} exceeds the server's limit maxResolution={max_res};"
                    " name a smaller size",
                    param="size",
                    code="limit_exceeded",
                )
            return native, native
        width, height = (int(v) for v in size.split("x"))
        for value in (width, height):
            if value < 8 or value % 8:
                raise ApiError(
                    HTTPStatus.BAD_REQUEST,
                    f"size {size}: width and height must be multiples of 8, at least 8",
                    param="size",
                    code="invalid_size",
                )
            if value > max_res:
                raise limit_error("size", size, "maxResolution", max_res)
        return width, height

    def _subjects(self, req: ImageGenerationRequest) -> list[tuple[Subject, float]]:
        """The adapters a request runs with: its `adapters` (plus the subject named by `model`), else the subject
        named by `model` at its weight, else (the base model) the configured adapters at theirs."""
        subject = None
        if req.model is not None and req.model != self.model_name:
            subject = self.catalog.resolve(req.model)
            if subject is None:
                raise ApiError(
                    HTTPStatus.NOT_FOUND,
                    f"the model {req.model!r} does not exist: neither the base model {self.model_name!r} nor a subject"
                    " (see GET /v1/models)",
                    param="model",
                    code="model_not_found",
                )
        if req.adapters is None:
            if subject is not None:
                return [(subject, subject.weight)]
            return [(s, s.weight) for s in self.catalog.defaults()]
        chosen: dict[str, tuple[Subject, float]] = {}
        for name, weight in req.adapters.items():
            found = self.catalog.resolve(name)
            if found is None:
                raise ApiError(
                    HTTPStatus.NOT_FOUND,
                    f"adapter {name!r} does not exist (see GET /v1/models)",
                    param="adapters",
                    code="model_not_found",
                )
            chosen[name] = (found, weight)
        if subject is not None and subject.name not in chosen:
            chosen[subject.name] = (subject, subject.weight)
        return list(chosen.values())

    async def _wait(self, job: Job, future: Any, disconnected: Callable[[], Awaitable[None]]) -> list[Any]:
        result = asyncio.wrap_future(future)
        result.add_done_callback(_retrieve)
        gone = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {result, gone}, timeout=max(0.0, job.deadline - time.monotonic()), return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            gone.cancel()
        if result not in done:
            self.engine.cancel(job)
            if gone in done:
                raise ApiError(499, "the client closed the connection", code="client_closed")
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the request's deadline of {self.limits.timeout:g} s passed (the server is busy)",
                code="timeout",
                retry_after=self.engine.retry_after(),
            )
        try:
            return list(result.result())
        except SubjectLoadError as err:
            if err.missing:
                raise ApiError(HTTPStatus.NOT_FOUND, str(err), param="model", code="model_not_found") from err
            raise ApiError(HTTPStatus.INTERNAL_SERVER_ERROR, str(err), code="adapter_load_failed") from err
        except (DeadlineExceededError, CancelledJobError) as err:
            raise ApiError(
                HTTPStatus.SERVICE_UNAVAILABLE,
                f"the request was dropped: {err or 'its deadline passed'}",
                code="timeout",
                retry_after=self.engine.retry_after(),
            ) from err
        except GenerationError as err:
            if err.out_of_memory:
                raise ApiError(
                    HTTPStatus.SERVICE_UNAVAILABLE,
                    f"generation failed: {err}",
                    code="out_of_memory",
                    retry_after=self.engine.retry_after(),
                ) from err
            raise ApiError(
                HTTPStatus.INTERNAL_SERVER_ERROR, f"generation failed: {err}", code="generation_failed"
            ) from err

    # ----- GET /v1/models ----------------------------------------------------------------------------
    async def models(self) -> ModelList:
        subjects = await run_in_threadpool(self.catalog.all)
        cards = [self._base_card()] + [self._card(s) for s in subjects if s.name != self.model_name]
        return ModelList(data=cards)

    async def model(self, name: str) -> ModelCard:
        if name == self.model_name:
            return self._base_card()
        subject = await run_in_threadpool(self.catalog.resolve, name)
        if subject is None:
            raise ApiError(
                HTTPStatus.NOT_FOUND, f"the model {name!r} does not exist", param="model", code="model_not_found"
            )
        return self._card(subject)

    def _base_card(self) -> ModelCard:
        root = self.config.model_uri or (self.config.base_model.to_wire() if self.config.base_model else None)
        return ModelCard(id=self.model_name, created=self.created, root=str(root) if root else None)

    def _card(self, subject: Subject) -> ModelCard:
        return ModelCard(id=subject.name, created=self.created, root=subject.uri, parent=self.model_name)


def _encode(images: list[Any]) -> list[str]:
    from dreambooth_trainer.imageio import encode_png

    return [base64.b64encode(encode_png(img)).decode() for img in images]


def _retrieve(future: asyncio.Future[Any]) -> None:
    """Mark a result nobody awaited any more as seen (no "exception was never retrieved" log)."""
    if not future.cancelled():
        future.exception()
