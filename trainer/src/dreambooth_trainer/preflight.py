"""`dreambooth-train --preflight`: check a job's input on a CPU before any GPU is held (the operator runs it as the
batch Job `<job>-check`, docs/architecture.md).

It runs the code that training runs first (storage.py, data.py, the checkpoint store), and stops before the model
stack loads:
1. every bucket the job names exists (instance images, output, checkpoints, base model): "bucket X does not exist";
2. the instance images are listed, read, decoded and validated exactly as training loads them (data.py);
3. the output is writable (a probe object is written and deleted) and holds no other run's checkpoints;
4. the base model is reachable: a diffusers folder under baseModel.uri (model_index.json and the parts training
   reads), or the hub repository and revision of baseModel.id (not checked when the hub cannot be reached);
5. with `captions: auto` or the judge on, spec.vlm answers: `models.list` through the openai client (one try, a
   short timeout) lists vlm.model. A refused key (401/403), an unknown model or a baseUrl without /models is
   invalid input; a timeout, a connection error, a 429 or a 5xx is transient (the captions and the judge would
   only fall back), so the check is inconclusive, as with a storage outage.

The outcome is the termination message (result.py) and the exit code (exitcodes.py): 0 with a summary; 10
(INVALID_INPUT) naming the problem; 11 (RETRYABLE) when storage failed after botocore's retries or the VLM endpoint
did not answer, which the operator retries with the Job controller's backoff and then counts as inconclusive.
Nothing else is written: no result.json, no config.json.
"""

from __future__ import annotations

import traceback
import uuid
from collections.abc import Callable
from pathlib import Path

from dreambooth_api.config import BaseModelSpec, JobConfig, load_job_config
from dreambooth_api.evaluation import CaptionMode
from dreambooth_api.exitcodes import ExitCode, InvalidInputError, RetryableError
from dreambooth_trainer.logging import log
from dreambooth_trainer.result import RunResult, write_termination_message
from dreambooth_trainer.storage import ObjectStore, StorageError, join_uri, parse_uri, relative_path

PROBE_PREFIX = ".preflight-probe-"
"""The name of the object written (and deleted at once) under output.uri to prove it is writable."""
HUB_TIMEOUT_SECONDS = 20.0


def job_uris(config: JobConfig) -> list[str]:
    """Every object-storage location the job reads or writes, in the order they are checked."""
    images = config.instance_images
    uris = [images.uri] if images.uri else list(images.files or [])
    uris += [config.output.uri, config.output.resolved_checkpoint_uri()]
    if config.base_model.uri:
        uris.append(config.base_model.uri)
    return uris


def buckets(config: JobConfig) -> list[str]:
    """The S3 buckets the job names, each once, in the order `job_uris` names them."""
    found: list[str] = []
    for uri in job_uris(config):
        parsed = parse_uri(uri)
        if parsed.scheme == "s3" and parsed.bucket not in found:
            found.append(parsed.bucket)
    return found


def _status_and_code(err: Exception) -> tuple[int | None, str]:
    response = getattr(err, "response", None) or {}
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    return (int(status) if status is not None else None), str((response.get("Error") or {}).get("Code") or "")


def check_bucket(store: ObjectStore, bucket: str) -> None:
    """HeadBucket: InvalidInputError when the bucket does not exist or the credentials may not use it; StorageError
    (retryable) for anything else that outlasted botocore's retries (5xx, throttling, the endpoint down)."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError

    try:
        store.s3.head_bucket(Bucket=bucket)
    except (NoCredentialsError, PartialCredentialsError) as err:
        raise InvalidInputError(f"no usable object-storage credentials for bucket {bucket}: {err}") from err
    except ClientError as err:
        status, code = _status_and_code(err)
        if status == 404 or code in ("404", "NoSuchBucket", "NotFound"):
            raise InvalidInputError(f"bucket {bucket} does not exist") from err
        if status == 403 or code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            raise InvalidInputError(
                f"access to bucket {bucket} is denied (HTTP 403): check the credentials and their permissions"
            ) from err
        raise StorageError(f"object storage failed for bucket {bucket}: {err}") from err
    except BotoCoreError as err:
        raise StorageError(f"object storage failed for bucket {bucket}: {err}") from err


def check_images(config: JobConfig, store: ObjectStore) -> int:
    """The instance images, loaded as training loads them (data.load_instance_examples); returns how many."""
    from dreambooth_trainer.data import load_instance_examples

    prior = config.prior_preservation
    images = config.instance_images
    if images.captions is CaptionMode.AUTO:  # the VLM writes the sidecars at the start of training, not yet
        images = images.model_copy(update={"captions": CaptionMode.OFF})
    examples = load_instance_examples(
        images,
        store,
        config.training.resolution,
        class_prompt=prior.class_prompt if prior.enabled else None,
    )
    return len(examples)


def check_output(config: JobConfig, store: ObjectStore) -> None:
    """The output prefix takes a write (a probe object, deleted at once), and holds no other run's checkpoints
    (the check training makes before it writes anything there)."""
    from dreambooth_trainer.checkpoint import CheckpointStore, run_fingerprint

    probe = join_uri(config.output.uri, f"{PROBE_PREFIX}{uuid.uuid4().hex}")
    try:
        store.write_bytes(probe, b"dreambooth pre-flight: this object is deleted at once\n")
        store.delete(probe)
    except (InvalidInputError, OSError) as err:  # OSError: a file:// output under a file, or read-only
        raise InvalidInputError(f"output.uri {config.output.uri} is not writable: {err}") from err
    checkpoints = CheckpointStore(store, config.output.resolved_checkpoint_uri(), fingerprint=run_fingerprint(config))
    checkpoints.check_compatible()


def check_base_model(spec: BaseModelSpec, store: ObjectStore) -> str:
    """The base model can be loaded from where the spec says; returns what was checked."""
    if spec.tiny:
        return "base model tiny (built from configs)"
    if spec.uri:
        return _check_model_folder(spec.uri, spec.variant, store)
    return _check_hub(spec)


def _check_model_folder(uri: str, variant: str | None, store: ObjectStore) -> str:
    from dreambooth_trainer.model_files import REQUIRED_PARTS, select_files

    listed = [relative_path(uri, o.uri) for o in store.list(uri)]
    if "model_index.json" not in listed:
        raise InvalidInputError(f"baseModel.uri {uri} is not a diffusers folder (no model_index.json)")
    selected = select_files(listed, variant)
    missing = [part for part in REQUIRED_PARTS if not any(p.startswith(f"{part}/") for p in selected)]
    if missing:
        raise InvalidInputError(f"base model {uri} is not a Stable Diffusion diffusers folder: missing {missing}")
    return f"base model {uri} ({len(selected)} files)"


def _check_hub(spec: BaseModelSpec) -> str:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    name = f"{spec.id}@{spec.revision}"
    if constants.HF_HUB_OFFLINE:
        return f"base model {name} not checked (HF_HUB_OFFLINE)"
    try:
        HfApi().model_info(str(spec.id), revision=spec.revision, timeout=HUB_TIMEOUT_SECONDS)
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as err:
        raise InvalidInputError(f"baseModel.id {name} cannot be loaded: {err}") from err
    except OSError as err:  # requests' connection errors and timeouts: the trainer may still find it cached
        log.warning("preflight_hub_unreachable", model=name, error=str(err))
        return f"base model {name} not checked (the hub could not be reached)"
    return f"base model {name}"


class VlmUnavailableError(RetryableError):
    """The VLM endpoint timed out, could not be reached or answered 429/5xx: the check is inconclusive."""

    reason = "VlmUnavailable"


def vlm_uses(config: JobConfig) -> list[str]:
    """What the job needs spec.vlm for: captions (auto) and the judge."""
    uses = []
    if config.instance_images.captions is CaptionMode.AUTO:
        uses.append("captions: auto")
    if config.evaluation is not None and config.evaluation.enabled and config.evaluation.judge:
        uses.append("evaluation.judge")
    return uses


def check_vlm(config: JobConfig) -> str | None:
    """spec.vlm answers and serves its model, when the job uses it; returns what was checked (None: not used).
    The API key is the trainer's (`DREAMBOOTH_VLM_API_KEY`, from vlm.credentialsSecret)."""
    uses = vlm_uses(config)
    if not uses or config.vlm is None:
        return None
    from dreambooth_api.vlm.client import probe_endpoint

    problem = probe_endpoint(config.vlm)
    if problem is None:
        return f"VLM {config.vlm.model} at {config.vlm.base_url} answers"
    message = f"spec.vlm (for {' and '.join(uses)}): {problem.message}"
    if problem.permanent:
        raise InvalidInputError(message)
    raise VlmUnavailableError(message)


def run_checks(config: JobConfig, store: ObjectStore, progress: Callable[[str], None] | None = None) -> str:
    """Every check, in order (the first failure raises); returns the summary for the termination message."""
    step = progress or (lambda _: None)
    step("buckets")
    names = buckets(config)
    for bucket in names:
        check_bucket(store, bucket)
    step("images")
    count = check_images(config, store)
    step("output")
    check_output(config, store)
    step("base model")
    model = check_base_model(config.base_model, store)
    step("vlm")
    vlm = check_vlm(config)
    where = config.instance_images.uri or "instanceImages.files"
    parts = [f"{count} instance image(s) in {where} decode"]
    if names:
        parts.append(f"bucket(s) {', '.join(names)} exist")
    parts += [f"{config.output.uri} is writable", model]
    if vlm:
        parts.append(vlm)
    return "; ".join(parts)


def run_preflight(config_path: Path | None) -> int:
    """Load the job's config, run the checks, write the termination message; returns the exit code."""
    from dreambooth_trainer.cli import classify

    try:
        config = load_job_config(config_path)
        log.bind(job=config.name, preflight=True)
        summary = run_checks(config, ObjectStore(config.storage), lambda name: log.info("preflight_check", check=name))
    except Exception as err:
        code, reason = classify(err)
        message = str(err) or type(err).__name__
        log.error(
            "preflight_failed",
            reason=reason,
            message=message,
            exitCode=int(code),
            traceback=traceback.format_exception(err)[-3:] if code is not ExitCode.INVALID_INPUT else None,
        )
        write_termination_message(RunResult(status="failed", reason=reason, message=message).to_wire())
        return int(code)
    log.info("preflight_passed", message=summary)
    write_termination_message(RunResult(status="succeeded", reason="InputValid", message=summary).to_wire())
    return int(ExitCode.SUCCESS)
