"""`run_evaluation`: sample the evaluation prompts, score the samples, judge them, and write the results.

The order keeps the peak memory low on one GPU: the trained model's samples, then the base model's (its pipeline
is only built then, when a factory is given), then the metric models (small: ViT-S/16 and CLIP ViT-B/32), then the
judge (network only). Sample j of prompt i uses seed `spec.seed + i * imagesPerPrompt + j` with its own generator,
for both models, so each base sample is the trained sample's counterpart from the same starting noise.

The judge never raises (`VlmClient`); loading a metric model that is not there raises InvalidInputError. The
caller (the training job, after export) catches it: an evaluation failure must not fail a trained job.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from dreambooth_api.evaluation import (
    EvaluationResult,
    EvaluationSpec,
    JudgeScores,
    PromptDetail,
    SampleJudgement,
    fill_prompt,
    split_subject,
)
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.vlm.client import VlmClient
from dreambooth_trainer.components import model_cache_dir
from dreambooth_trainer.evaluation.judge import judge_samples, quality_gate, summarize, unknown_judge
from dreambooth_trainer.evaluation.metrics import Embeddings, MetricModels, load_metric_models, score
from dreambooth_trainer.evaluation.outputs import make_grid, write_grid, write_result, write_samples
from dreambooth_trainer.imageio import decode_image, is_image_name
from dreambooth_trainer.pipelines import autocast, generator_for
from dreambooth_trainer.storage import ObjectStore

PipelineSource = Any
"""A diffusers pipeline, or a function of no arguments that builds one (called when its samples are due)."""
Progress = Callable[[str, int, int], None]
"""progress(stage, prompts done, prompts in all)."""

NO_VLM_REASON = "evaluation.judge is on but no VLM is configured (spec.vlm)"
# Reference images read from a prefix (every one is compared with every sample).
MAX_REFERENCE_IMAGES = 64


def load_images(store: ObjectStore, prefix_uri: str, max_images: int = MAX_REFERENCE_IMAGES) -> list[Image.Image]:
    """The images (jpg, jpeg, png, webp) under a prefix, decoded safely (`evaluation.referenceImages`); raises
    InvalidInputError when there is none or one is not a valid image."""
    uris = sorted(o.uri for o in store.list(prefix_uri) if is_image_name(o.uri))[:max_images]
    if not uris:
        raise InvalidInputError(f"no images (jpg, jpeg, png, webp) under {prefix_uri}")
    return [decode_image(store.read_bytes(uri), uri) for uri in uris]


def sample_seeds(spec: EvaluationSpec, prompt_index: int) -> list[int]:
    """The seeds of prompt `prompt_index`'s samples."""
    first = spec.seed + prompt_index * spec.images_per_prompt
    return list(range(first, first + spec.images_per_prompt))


def resolve_pipeline(source: PipelineSource) -> Any:
    """The pipeline itself, or what the factory builds."""
    from diffusers import DiffusionPipeline

    if isinstance(source, DiffusionPipeline):
        return source
    if callable(source):
        return source()
    raise TypeError(f"expected a diffusers pipeline or a function that builds one, got {type(source).__name__}")


@torch.no_grad()
def generate_samples(
    pipeline: Any,
    prompts: Sequence[str],
    spec: EvaluationSpec,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    on_prompt: Callable[[int, int], None] | None = None,
) -> list[list[Image.Image]]:
    """`spec.images_per_prompt` samples of each prompt, each from its own seeded generator; `on_prompt(done,
    total)` after each prompt."""
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(disable=True)
    dev = torch.device(device)
    out: list[list[Image.Image]] = []
    with autocast(dev, autocast_dtype):
        for i, prompt in enumerate(prompts):
            images = pipeline(
                prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=spec.num_inference_steps,
                guidance_scale=spec.guidance_scale,
                num_images_per_prompt=spec.images_per_prompt,
                generator=[generator_for(seed, dev) for seed in sample_seeds(spec, i)],
            ).images
            out.append(list(images))
            if on_prompt is not None:
                on_prompt(i + 1, len(prompts))
    return out


def _sample(
    source: PipelineSource,
    prompts: Sequence[str],
    spec: EvaluationSpec,
    resolution: int | None,
    device: torch.device | str,
    autocast_dtype: torch.dtype | None,
    on_prompt: Callable[[int, int], None] | None,
) -> list[list[Image.Image]]:
    pipeline = resolve_pipeline(source)
    try:
        return generate_samples(pipeline, prompts, spec, resolution, device, autocast_dtype, on_prompt)
    finally:
        del pipeline
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _stage(progress: Progress | None, stage: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(stage, done, total)


def _flat(samples: Sequence[Sequence[Image.Image]]) -> list[Image.Image]:
    return [img for row in samples for img in row]


def _judge(
    spec: EvaluationSpec,
    client: VlmClient | None,
    references: Sequence[Image.Image],
    samples: list[list[Image.Image]],
    text_prompts: list[str],
    names: list[list[str]],
) -> tuple[JudgeScores | None, list[list[SampleJudgement]]]:
    if not spec.judge:
        return None, [[] for _ in samples]
    if client is None:
        return unknown_judge(NO_VLM_REASON, len(_flat(samples))), [[] for _ in samples]
    judgements = judge_samples(client, references, samples, text_prompts, names)
    return summarize([j for row in judgements for j in row]), judgements


def run_evaluation(
    pipeline: PipelineSource,
    spec: EvaluationSpec,
    references: Sequence[Image.Image],
    subject_text: str,
    output_dir: Path,
    vlm_client: VlmClient | None = None,
    base_pipeline: PipelineSource | None = None,
    *,
    identifier: str | None = None,
    metric_models: MetricModels | None = None,
    cache_dir: Path | None = None,
    store: ObjectStore | None = None,
    resolution: int | None = None,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> EvaluationResult:
    """Evaluate the trained `pipeline` (and `base_pipeline` when given and `spec.baseline`) and write the results.

    `references` are the subject's photos (the instance images, or `load_images(spec.reference_images)`);
    `subject_text` is what the prompts call the subject ("sks dog", see `subject_from_prompt`; `spec.subject` wins
    when set), its identifier `identifier` or its first word. CLIP-T and the judge read the prompts with the class
    words alone ("a dog in the jungle"). `metric_models` are loaded from `spec` (into `cache_dir`, downloading with
    `store`) when not given. `resolution` defaults to the pipeline's. `progress(stage, done, total)` is called after
    each prompt's samples (stage "trained" or "base"), for the job's /progress. The files are described in
    `outputs`; the result is also returned.
    """
    started = clock()
    if not references:
        raise ValueError("run_evaluation needs at least one reference image")
    output_dir = Path(output_dir)
    subject_text = spec.subject or subject_text
    _ident, class_words = split_subject(subject_text, identifier)
    templates = spec.templates()
    prompts = [fill_prompt(t, subject_text) for t in templates]
    text_prompts = [fill_prompt(t, class_words or subject_text) for t in templates]

    trained = _sample(pipeline, prompts, spec, resolution, device, autocast_dtype, _stage(progress, "trained"))
    base = None
    if base_pipeline is not None and spec.baseline:
        base = _sample(base_pipeline, prompts, spec, resolution, device, autocast_dtype, _stage(progress, "base"))
    trained_names = write_samples(output_dir, "trained", trained)
    base_names = write_samples(output_dir, "base", base) if base else [[] for _ in prompts]

    if metric_models is None:
        cache = cache_dir or model_cache_dir(Path(tempfile.gettempdir()) / "dreambooth-models")
        metric_models = load_metric_models(spec, cache, store, device)
    n = spec.images_per_prompt
    refs = metric_models.embed(references)
    texts = metric_models.clip.embed_texts(text_prompts).repeat_interleave(n, dim=0)
    trained_emb = metric_models.embed(_flat(trained))
    base_emb: Embeddings | None = metric_models.embed(_flat(base)) if base else None

    judge, judgements = _judge(spec, vlm_client, references, trained, text_prompts, trained_names)
    gate, gate_reason = quality_gate(judge, spec.min_score)

    details = []
    for i, template in enumerate(templates):
        rows = slice(i * n, (i + 1) * n)
        details.append(
            PromptDetail(
                template=template,
                prompt=prompts[i],
                text_prompt=text_prompts[i],
                seeds=sample_seeds(spec, i),
                images=trained_names[i],
                base_images=base_names[i],
                trained=score(trained_emb.rows(rows.start, rows.stop), refs, texts[rows]),
                base=score(base_emb.rows(rows.start, rows.stop), refs, texts[rows]) if base_emb else None,
                judgements=judgements[i],
            )
        )
    result = EvaluationResult(
        trained=score(trained_emb, refs, texts),
        base=score(base_emb, refs, texts) if base_emb else None,
        judge=judge,
        quality_gate=gate,
        quality_gate_reason=gate_reason,
        min_score=spec.min_score,
        prompts=details,
        images_per_prompt=n,
        reference_images=len(references),
        dino_model=metric_models.dino_identity,
        clip_model=metric_models.clip_identity,
        grid=write_grid(output_dir, make_grid(trained, base)),
    )
    result.seconds = round(clock() - started, 3)
    write_result(output_dir, result)
    return result
