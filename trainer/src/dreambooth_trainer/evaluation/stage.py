"""The evaluation's place in a training job: captions before training, the record of the prompts trained on, and the
evaluation after export. `trainer/job.py` calls these three; each is a no-op when its feature is off.

- `caption_stage` (rank 0, before the dataset is read): with `instanceImages.captions: auto`, the VLM writes a .txt
  sidecar next to each instance image (existing ones kept unless `overwriteCaptions`; even then, a resumed run keeps
  the captions its earlier attempt recorded in captions.json). The other ranks read the sidecars after rank 0 is
  done (the caller runs it through `on_rank0`, which every rank waits for).
- `record_prompts` (rank 0): `<output>/captions.json`, the caption each instance image was trained with.
- `evaluation_stage` (rank 0, after export): `run_evaluation` on the trained modules and on the base model (loaded
  again from the model cache: the same weights the run started from; after training, so the trained model's samples
  are done before the base pipeline takes memory), the folder uploaded to `<output>/`, and the part of the result
  that goes into the termination message (flat scores, gate, where the detail is). It never raises: an evaluation
  problem is reported (`evaluationError`), the trained job still succeeds.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from dreambooth_api.config import CAPTIONS_NEED_VLM, JobConfig, Sampler
from dreambooth_api.evaluation import CaptionMode, CaptionsSpec, EvaluationResult
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.progress import TrainerPhase
from dreambooth_api.vlm import captions as caption_rules
from dreambooth_trainer.data import list_instance_uris
from dreambooth_trainer.distributed import broadcast_object
from dreambooth_trainer.evaluation.outputs import FOLDER
from dreambooth_trainer.imageio import decode_image
from dreambooth_trainer.storage import ObjectStore, join_uri

if TYPE_CHECKING:
    from dreambooth_api.vlm.client import VlmClient
    from dreambooth_trainer.progress import Progress

T = TypeVar("T")

CAPTIONS_FILE = "captions.json"
# Termination-message budget (4 KiB in all): reasons are cut to this many characters.
MAX_REASON = 300
MAX_REFERENCE_IMAGES = 64

Log = Any
"""The trainer's EventLog (info/warning with keyword fields)."""


def _short(text: str, limit: int = MAX_REASON) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def subject_and_identifier(config: JobConfig) -> tuple[str, str | None]:
    """What prompts call the subject ("sks dog") and its identifier ("sks") (`captions.subject_and_identifier`)."""
    return caption_rules.subject_and_identifier(config.instance_images, config.prior_preservation.class_prompt)


def caption_stage(config: JobConfig, store: ObjectStore, log: Log, client: VlmClient | None = None) -> dict[str, int]:
    """Caption the instance images with the VLM (`captions: auto`); returns how many captions came from where
    (vlm, existing, fallback); empty when captions are not auto. Raises InvalidInputError when the images cannot be
    listed or read, or the identifier is unknown (training would fail on them the same way)."""
    spec = config.instance_images
    if spec.captions is not CaptionMode.AUTO:
        return {}
    if config.vlm is None:
        raise InvalidInputError(CAPTIONS_NEED_VLM)
    subject, identifier = subject_and_identifier(config)
    if identifier is None:
        raise InvalidInputError(
            "captions: auto needs the identifier token: set instanceImages.identifier (or a class prompt)"
        )
    from dreambooth_api.vlm.client import VlmClient

    uris = list_instance_uris(spec, store)
    recorded = recorded_prompts(config, store, log) if spec.overwrite_captions else {}
    own = client is None
    vlm = client or VlmClient(config.vlm)
    try:
        outcomes = caption_rules.write_captions(
            vlm,
            store,
            uris,
            subject,
            CaptionsSpec(overwrite=spec.overwrite_captions),
            fallback=spec.prompt,
            identifier=identifier,
            decode=decode_image,
            recorded=recorded,
        )
    finally:
        if own:
            vlm.close()
    counts = Counter(o.source for o in outcomes)
    reasons = Counter(o.reason for o in outcomes if o.reason)
    log.info(
        "captions",
        images=len(outcomes),
        vlm=counts["vlm"],
        existing=counts["existing"],
        fallback=counts["fallback"],
        reason=_short(reasons.most_common(1)[0][0]) if reasons else None,
    )
    return {"vlm": counts["vlm"], "existing": counts["existing"], "fallback": counts["fallback"]}


def recorded_prompts(config: JobConfig, store: ObjectStore, log: Log) -> dict[str, str]:
    """`<output>/captions.json` of an earlier attempt of this run ({image URI: caption}); empty when there is none
    or it cannot be read (then the images are captioned again, as on a first attempt)."""
    uri = join_uri(config.output.uri, CAPTIONS_FILE)
    try:
        if not store.exists(uri):
            return {}
        doc = json.loads(store.read_bytes(uri))
    except Exception as err:  # a record, not an input: caption again
        log.warning("training_prompts_unreadable", uri=uri, error=_short(f"{type(err).__name__}: {err}"))
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}


def record_prompts(config: JobConfig, dataset: Any, store: ObjectStore) -> str:
    """Write `<output>/captions.json` ({image URI: the caption it was trained with}); returns its URI."""
    captions = {e.source: e.caption for e in getattr(dataset, "instances", [])}
    uri = join_uri(config.output.uri, CAPTIONS_FILE)
    store.write_bytes(uri, (json.dumps(captions, indent=2, sort_keys=True) + "\n").encode())
    return uri


def reference_images(config: JobConfig, store: ObjectStore) -> list[Any]:
    """`evaluation.referenceImages`, or the instance images."""
    from dreambooth_trainer.evaluation.runner import load_images

    spec = config.evaluation
    if spec is not None and spec.reference_images:
        return load_images(store, spec.reference_images)
    uris = list_instance_uris(config.instance_images, store)[:MAX_REFERENCE_IMAGES]
    return [decode_image(store.read_bytes(uri), uri) for uri in uris]


def _pipeline_of(module: Any) -> Any:
    from dreambooth_trainer.pipelines import build_pipeline

    for part in (module.unet, module.vae, module.text_encoder):
        part.eval()
    return build_pipeline(
        module.unet, module.vae, module.text_encoder, module.tokenizer, module.noise_scheduler.config, Sampler.DDIM
    )


def _base_factory(config: JobConfig, store: ObjectStore, cache_dir: Path, device: torch.device) -> Callable[[], Any]:
    def build() -> Any:
        from dreambooth_trainer.components import load_components
        from dreambooth_trainer.pipelines import build_pipeline

        comps = load_components(config.base_model, store, cache_dir)
        for part in (comps.unet, comps.vae, comps.text_encoder):
            part.to(device)
        return build_pipeline(
            comps.unet, comps.vae, comps.text_encoder, comps.tokenizer, comps.noise_scheduler.config, Sampler.DDIM
        )

    return build


def termination_fields(result: EvaluationResult, output_uri: str) -> dict[str, Any]:
    """What of the result goes into the termination message (bounded: 8 numbers, the gate, two short strings)."""
    doc: dict[str, Any] = {
        "evaluation": {k: round(v, 6) for k, v in result.scores().items()},
        "evaluationUri": join_uri(output_uri, FOLDER),
        "qualityGate": result.quality_gate.value,
    }
    if result.quality_gate_reason:
        doc["qualityGateReason"] = _short(result.quality_gate_reason)
    return doc


def evaluation_stage(
    config: JobConfig,
    module: Any,
    store: ObjectStore,
    workdir: Path,
    cache_dir: Path,
    log: Log,
    *,
    vlm_client: VlmClient | None = None,
) -> dict[str, Any]:
    """Evaluate the trained model (`spec.evaluation`), upload the files to `<output>/`, and return the termination
    message's evaluation fields; empty when evaluation is off; `evaluationError` (never an exception) on failure."""
    spec = config.evaluation
    if spec is None or not spec.enabled:
        return {}
    from dreambooth_api.vlm.client import VlmClient
    from dreambooth_trainer.evaluation.runner import run_evaluation
    from dreambooth_trainer.validation import validation_autocast_dtype

    out_dir = Path(workdir) / "evaluation-output"
    shutil.rmtree(out_dir, ignore_errors=True)
    own = vlm_client is None and spec.judge and config.vlm is not None
    client = VlmClient(config.vlm) if own and config.vlm is not None else vlm_client
    try:
        device = next(module.unet.parameters()).device
        subject, identifier = subject_and_identifier(config)
        log.info("evaluation_started", prompts=len(spec.templates()), imagesPerPrompt=spec.images_per_prompt)
        result = run_evaluation(
            _pipeline_of(module),
            spec,
            reference_images(config, store),
            subject,
            out_dir,
            client,
            _base_factory(config, store, cache_dir, device),
            identifier=identifier,
            cache_dir=cache_dir,
            store=store,
            resolution=config.training.resolution,
            device=device,
            autocast_dtype=validation_autocast_dtype(module),
            progress=lambda stage, done, total: log.info("evaluation_progress", stage=stage, done=done, total=total),
        )
        store.upload_dir(out_dir, config.output.uri)
    except Exception as err:  # an evaluation problem must not fail a trained job
        reason = _short(f"{type(err).__name__}: {err}")
        log.warning("evaluation_failed", error=reason)
        return {"evaluationError": reason}
    finally:
        if own and client is not None:
            client.close()
    fields = termination_fields(result, config.output.uri)
    log.info(
        "evaluation",
        scores=fields["evaluation"],
        qualityGate=fields["qualityGate"],
        reason=fields.get("qualityGateReason"),
        seconds=result.seconds,
    )
    return fields


# The job runner's calls. Rank 0 does the work; its value (or its error) reaches every rank, so that no rank goes
# on to read captions that are not written yet, or waits in a collective for a rank that failed.


def _on_rank0(fabric: Any, fn: Callable[[], T]) -> T:
    error: Exception | None = None
    outcome: tuple[bool, Any] = (True, None)
    if int(getattr(fabric, "global_rank", 0)) == 0:
        try:
            outcome = (True, fn())
        except Exception as err:  # broadcast first: the others wait for this outcome
            error = err
            outcome = (False, str(err) or type(err).__name__)
    ok, payload = broadcast_object(fabric, outcome)
    if not ok:
        raise error if error is not None else InvalidInputError(f"rank 0: {payload}")
    value: T = payload
    return value


def captions_before_training(fabric: Any, config: JobConfig, store: ObjectStore, log: Log) -> None:
    """`caption_stage` on rank 0 with `captions: auto`; every rank returns once the sidecars are written."""
    if config.instance_images.captions is CaptionMode.AUTO:
        _on_rank0(fabric, lambda: caption_stage(config, store, log))


def record_prompts_of(fabric: Any, config: JobConfig, dataset: Any, store: ObjectStore, log: Log) -> None:
    """Rank 0 writes `<output>/captions.json` when the images have captions (sidecar or auto)."""
    if config.instance_images.captions is CaptionMode.OFF or int(getattr(fabric, "global_rank", 0)) != 0:
        return
    try:
        log.info("training_prompts", uri=record_prompts(config, dataset, store))
    except Exception as err:  # a record, not an input of training
        log.warning("training_prompts_not_written", error=_short(str(err)))


def evaluate_after_export(
    fabric: Any,
    config: JobConfig,
    module: Any,
    store: ObjectStore,
    workdir: Path,
    cache_dir: Path,
    log: Log,
    *,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`evaluation_stage` on rank 0 (the others wait for it); the fields for the result document. Rank 0's
    `/progress` (`progress`, the trainer's Progress) says Evaluating meanwhile."""
    if config.evaluation is None or not config.evaluation.enabled:
        return {}
    if progress is not None and int(getattr(fabric, "global_rank", 0)) == 0:
        progress.set_phase(TrainerPhase.EVALUATING)
    return _on_rank0(fabric, lambda: evaluation_stage(config, module, store, workdir, cache_dir, log))
