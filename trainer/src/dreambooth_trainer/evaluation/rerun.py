"""`python -m dreambooth_trainer.evaluation.rerun OUTPUT`: evaluate a finished run's exported model again.

OUTPUT is a run's output folder (a local path or file:// URI: what `dreambooth run --local` wrote) holding
`config.json` (the run's JobConfig, with `evaluation` and `vlm`) and the export: `model/` (a diffusers folder) or,
for a LoRA-only export, `lora/` on top of the base model. The files go where the job's evaluation writes them
(`evaluation.json`, `evaluation/`), and the termination-message fields are printed as one JSON line on stdout.
`dreambooth evaluate DIR` runs this (the CLI never imports the trainer). Exit 0 when scores were written, 10 when
the run cannot be evaluated (no config, no evaluation section, no exported model), 1 when the evaluation failed.

`dreambooth-train --evaluate` (the operator's `<job>-eval` pod, for `dreambooth evaluate NAME`) runs
`evaluate_stored`: the job's config from the pod's ConfigMap, the exported model downloaded from `<output.uri>`,
the results uploaded there; the outcome goes to the termination message as training's does (`main_stored`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from dreambooth_api.config import ConfigError, JobConfig, load_job_config
from dreambooth_api.exitcodes import ExitCode, InvalidInputError
from dreambooth_trainer.logging import log
from dreambooth_trainer.result import write_termination_message
from dreambooth_trainer.storage import ObjectNotFoundError, ObjectStore, join_uri

EXPORT_FOLDERS = ("model", "lora")
"""Where an export lies under `<output.uri>`: a diffusers folder, or LoRA weights on top of the base model."""


def _local(path: str) -> Path:
    return Path(path.removeprefix("file://")).resolve()


def load_exported(config: JobConfig, output: Path, store: ObjectStore, cache_dir: Path) -> Any:
    """The exported model's parts (the trained weights), loaded as the base model's are."""
    from dreambooth_trainer.components import load_components, load_components_from_dir

    model = output / "model"
    if (model / "model_index.json").is_file():
        return load_components_from_dir(model, name=str(model))
    lora = output / "lora"
    if (lora / "pytorch_lora_weights.safetensors").is_file():
        from dreambooth_trainer.evaluation.stage import _pipeline_of

        comps = load_components(config.base_model, store, cache_dir)
        pipe = _pipeline_of(comps)
        pipe.load_lora_weights(str(lora))
        return comps
    raise InvalidInputError(f"{output}: no exported model (model/model_index.json or lora/)")


def rerun(output: Path, workdir: Path) -> dict[str, Any]:
    """Evaluate the run in `output` again; returns the termination-message fields."""
    from dreambooth_trainer.components import model_cache_dir
    from dreambooth_trainer.evaluation.stage import evaluation_stage

    config_path = output / "config.json"
    if not config_path.is_file():
        raise InvalidInputError(f"{output}: no config.json (not a run's output folder)")
    try:
        config = load_job_config(config_path)
    except ConfigError as err:
        raise InvalidInputError(f"{config_path}: {err}") from err
    if config.evaluation is None or not config.evaluation.enabled:
        raise InvalidInputError(f"{config_path}: the run has no evaluation (spec.evaluation.enabled)")
    # Results go next to the model being evaluated, whatever output.uri the run had.
    config = config.model_copy(update={"output": config.output.model_copy(update={"uri": f"file://{output}"})})
    store = ObjectStore(config.storage)
    cache = model_cache_dir(workdir / "models")
    module = _on_device(load_exported(config, output, store, cache))
    return evaluation_stage(config, module, store, workdir, cache, log)


def _on_device(module: Any) -> Any:
    import torch

    if torch.cuda.is_available():
        for part in (module.unet, module.vae, module.text_encoder):
            part.to("cuda")
    return module


def evaluate_stored(config: JobConfig, workdir: Path) -> dict[str, Any]:
    """Evaluate the exported model of `config`'s job (under its `output.uri`, in object storage) again; the files go
    to `<output.uri>` as the job's evaluation writes them. Returns the termination-message fields."""
    from dreambooth_trainer.components import model_cache_dir
    from dreambooth_trainer.evaluation.stage import evaluation_stage

    if config.evaluation is None or not config.evaluation.enabled:
        raise InvalidInputError("the job has no evaluation (spec.evaluation.enabled)")
    store = ObjectStore(config.storage)
    local = workdir / "output"
    for folder in EXPORT_FOLDERS:
        try:
            store.download_dir(join_uri(config.output.uri, folder), local / folder)
            break
        except ObjectNotFoundError:
            continue
    else:
        raise InvalidInputError(f"{config.output.uri}: no exported model (model/ or lora/)")
    cache = model_cache_dir(workdir / "models")
    module = _on_device(load_exported(config, local, store, cache))
    log.info("evaluate_started", model=join_uri(config.output.uri, EXPORT_FOLDERS[0]))
    return evaluation_stage(config, module, store, workdir, cache, log)


def main_stored(config_path: Path | None, workdir: Path | None) -> int:
    """`dreambooth-train --evaluate`: exit 0 with the scores in the termination message, 10 when the job cannot be
    evaluated (no evaluation section, no exported model), 11 when the evaluation failed (the Job retries once)."""
    try:
        config = load_job_config(config_path)
        with tempfile.TemporaryDirectory(prefix="dreambooth-evaluate-") as tmp:
            fields = evaluate_stored(config, workdir or Path(tmp))
    except (InvalidInputError, ConfigError) as err:
        log.error("evaluate_failed", reason="InvalidInput", message=str(err))
        write_termination_message({"status": "failed", "reason": "InvalidInput", "message": str(err)})
        return int(ExitCode.INVALID_INPUT)
    if "evaluationError" in fields:
        doc = {"status": "failed", "reason": "EvaluationFailed", "message": fields["evaluationError"], **fields}
        write_termination_message(doc)
        return int(ExitCode.RETRYABLE)
    write_termination_message({"status": "succeeded", **fields})
    log.info("evaluated", **fields)
    return int(ExitCode.SUCCESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dreambooth_trainer.evaluation.rerun", description=__doc__)
    parser.add_argument("output", help="the run's output folder (path or file:// URI)")
    parser.add_argument("--workdir", default=None, help="scratch folder (model cache, samples before upload)")
    args = parser.parse_args(argv)
    output = _local(args.output)
    with tempfile.TemporaryDirectory(prefix="dreambooth-evaluate-") as tmp:
        workdir = Path(args.workdir) if args.workdir else Path(tmp)
        try:
            fields = rerun(output, workdir)
        except InvalidInputError as err:
            print(json.dumps({"error": str(err)}))  # the CLI reads this line
            return int(ExitCode.INVALID_INPUT)
    print(json.dumps(fields, sort_keys=True))  # the CLI reads this line
    return 1 if "evaluationError" in fields else 0


if __name__ == "__main__":
    sys.exit(main())
