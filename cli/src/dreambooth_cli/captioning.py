"""`dreambooth submit --caption`: caption the local photos with the job's VLM before they are uploaded.

The captions are what the trainer's `captions: auto` would write (the same `dreambooth_api.vlm.captions` rules:
the subject text, "sks dog", in every caption), as .txt sidecars next to the photos, so the user can read and edit
them; `submit` then uploads photos and sidecars and creates the job with `instanceImages.captions: sidecar`. An
image that already has a sidecar keeps it unless `overwrite`. The VLM's API key is `DREAMBOOTH_VLM_API_KEY` in the
user's environment (never read from the cluster's Secret: the user's machine talks to the endpoint itself).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dreambooth_api.config import ConfigError, JobConfig, parse_job_config
from dreambooth_api.evaluation import VLM_API_KEY_ENV, CaptionMode, CaptionsSpec
from dreambooth_api.trainer_config import build_trainer_config
from dreambooth_api.vlm.captions import CaptionOutcome, subject_and_identifier, write_captions
from dreambooth_cli.errors import CliError, ExitStatus, InputError
from dreambooth_cli.sync import IMAGE_SUFFIXES


@dataclass(frozen=True)
class CaptionReport:
    """What `--caption` did to a folder."""

    folder: Path
    written: int
    """Captions the VLM wrote."""
    kept: int
    """Sidecars that were there already (kept without --overwrite-captions)."""
    fallback: int
    """Images the VLM could not caption: their sidecar holds the instance prompt."""
    reason: str | None = None
    """Why the VLM could not caption (the commonest reason)."""


class FolderStore:
    """The caption rules' storage (`SidecarStore`) over a local folder: URIs are file paths."""

    def read_bytes(self, uri: str) -> bytes:
        return Path(uri).read_bytes()

    def write_bytes(self, uri: str, data: bytes) -> None:
        Path(uri).write_bytes(data)

    def exists(self, uri: str) -> bool:
        return Path(uri).is_file()


def local_images(folder: Path) -> list[str]:
    """The photos directly in `folder` (what `--images` uploads), sorted by name."""
    return [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]


def job_config(job: Mapping[str, Any], label: str) -> JobConfig:
    """The job's trainer config (what the trainer will read), for its instance prompt, identifier and VLM."""
    try:
        return parse_job_config(build_trainer_config(job))
    except ConfigError as err:
        raise InputError(f"{label}: {err}") from err


def report(folder: Path, outcomes: list[CaptionOutcome]) -> CaptionReport:
    counts = Counter(o.source for o in outcomes)
    reasons = Counter(o.reason for o in outcomes if o.reason)
    reason = reasons.most_common(1)[0][0] if reasons else None
    return CaptionReport(folder, counts["vlm"], counts["existing"], counts["fallback"], reason)


def caption_folder(
    job: Mapping[str, Any], folder: Path, *, overwrite: bool = False, label: str = "the job"
) -> CaptionReport:
    """Write the .txt sidecars of the photos in `folder` with the job's `spec.vlm` (InputError when the job has no
    VLM or no identifier; a CliError when the endpoint does not answer, before any sidecar is written)."""
    from dreambooth_api.vlm.client import VlmClient, probe_endpoint

    config = job_config(job, label)
    if config.vlm is None:
        raise InputError(f"{label}: --caption needs spec.vlm (the vision-language model that writes the captions)")
    subject, identifier = subject_and_identifier(config.instance_images, config.prior_preservation.class_prompt)
    if identifier is None:
        raise InputError(
            f"{label}: --caption needs the identifier token: set instanceImages.identifier (or a class prompt)"
        )
    images = local_images(folder)
    if not images:
        raise InputError(f"{folder}: no images (jpg, jpeg, png, webp)")
    problem = probe_endpoint(config.vlm)
    if problem is not None:
        hint = f" (the API key comes from ${VLM_API_KEY_ENV})" if problem.auth else ""
        raise CliError(f"--caption: {problem.message}{hint}", ExitStatus.ERROR)
    with VlmClient(config.vlm) as client:
        try:
            outcomes = write_captions(
                client,
                FolderStore(),
                images,
                subject,
                CaptionsSpec(overwrite=overwrite),
                fallback=config.instance_images.prompt,
                identifier=identifier,
            )
        except ValueError as err:  # an undecodable photo
            raise InputError(str(err)) from err
    return report(folder, outcomes)


def as_sidecar_job(job: dict[str, Any]) -> None:
    """Train on the sidecars as they are (the user's to read and edit), not on new VLM captions."""
    job["spec"]["instanceImages"]["captions"] = CaptionMode.SIDECAR.value
    job["spec"]["instanceImages"].pop("overwriteCaptions", None)
