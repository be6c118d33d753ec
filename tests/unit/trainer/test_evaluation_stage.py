"""The evaluation in a training job: `dreambooth-train --local` on the tiny model with captions: auto, evaluation and
the judge against the fake VLM; the termination message carries the scores and the gate; nothing fails the job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from PIL import Image

from dreambooth_api import env
from dreambooth_api.config import parse_job_config
from dreambooth_api.evaluation import CaptionMode, EvaluationResult, JudgeScores, JudgeStatus, MetricScores, QualityGate
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.progress import TrainerPhase
from dreambooth_trainer.evaluation.judge import CONCEPT_TASK, PROMPT_TASK
from dreambooth_trainer.evaluation.stage import (
    caption_stage,
    evaluate_after_export,
    record_prompts,
    termination_fields,
)
from dreambooth_trainer.progress import Progress
from dreambooth_trainer.result import MAX_TERMINATION_BYTES, encode_termination_message
from dreambooth_trainer.storage import ObjectStore
from tests.infra.fake_vlm import FakeVlm, task_responder, vllm_reply
from tests.infra.processes import free_port

TRAINER = str(Path(sys.executable).parent / "dreambooth-train")
DREAMBOOTH = str(Path(sys.executable).parent / "dreambooth")
CAPTION = "a photo of a toy lying on a red couch by a window"
API_KEY = "sk-test-not-a-real-key"


@pytest.fixture(scope="module")
def server() -> Iterator[FakeVlm]:
    with FakeVlm() as server:
        yield server


def _images(folder: Path, n: int = 2) -> None:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (64, 64), (200 - 40 * i, 30 + 50 * i, 90)).save(folder / f"img{i}.png")


def _config(tmp_path: Path, base_url: str, **evaluation: Any) -> dict[str, Any]:
    return {
        "name": "eval",
        "instanceImages": {
            "uri": f"file://{tmp_path}/images",
            "prompt": "a photo of sks toy",
            "identifier": "sks",
            "captions": "auto",
        },
        "training": {
            "maxSteps": 2,
            "resolution": 32,
            "method": "full",
            "learningRate": 0.001,
            "checkpoint": {"intervalSteps": None, "intervalSeconds": None},
        },
        "output": {"uri": f"file://{tmp_path}/out", "formats": ["diffusers"], "dtype": "fp32"},
        "evaluation": {
            "enabled": True,
            "prompts": ["a {} on the beach", "a red {}"],
            "numInferenceSteps": 2,
            "guidanceScale": 1.0,
            "dinoModel": {"tiny": True},
            "clipModel": {"tiny": True},
            "judge": True,
            "minScore": 3.0,
            **evaluation,
        },
        "vlm": {"baseUrl": base_url, "model": "m", "maxRetries": 1, "timeoutSeconds": 120},
    }


def _train(tmp_path: Path, config: dict[str, Any]) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    parse_job_config(config)  # the test's own config is valid
    path = tmp_path / "job.json"
    path.write_text(json.dumps(config))
    term = tmp_path / "termination-log"
    environ = {
        **os.environ,
        "TERMINATION_MESSAGE_PATH": str(term),
        env.WORKDIR: str(tmp_path / "work"),
        env.METRICS_PORT: "0",
        env.VLM_API_KEY: API_KEY + "\n",  # as a Secret's value often is
    }
    proc = subprocess.run(
        [TRAINER, "--config", str(path), "--local"], env=environ, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    events = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert term.exists(), proc.stderr[-3000:]
    return proc.returncode, json.loads(term.read_text()), events


def test_a_job_captions_its_images_trains_on_them_and_reports_the_gate(server: FakeVlm, tmp_path: Path) -> None:
    server.reset(
        task_responder(
            {
                "caption": json.dumps({"caption": CAPTION}),
                CONCEPT_TASK: json.dumps({"reason": "a different toy", "score": 1}),
                PROMPT_TASK: json.dumps({"reason": "follows it", "score": 4}),
            }
        )
    )
    _images(tmp_path / "images")
    (tmp_path / "images" / "img1.txt").write_text("a photo of sks toy on a shelf\n")  # kept: not overwritten

    code, term, events = _train(tmp_path, _config(tmp_path, server.base_url))

    assert code == 0, term
    assert term["status"] == "succeeded"
    # Captions: one written by the VLM (the class mention became the subject), one kept; training used both.
    written = (tmp_path / "images" / "img0.txt").read_text().strip()
    assert written == "a photo of a sks toy lying on a red couch by a window"
    trained_on = json.loads((tmp_path / "out" / "captions.json").read_text())
    assert trained_on == {
        f"file://{tmp_path}/images/img0.png": written,
        f"file://{tmp_path}/images/img1.png": "a photo of sks toy on a shelf",
    }
    [captions] = [e for e in events if e.get("event") == "captions"]
    assert (captions["vlm"], captions["existing"], captions["fallback"]) == (1, 1, 0)
    # The key came from the environment (stripped), as a bearer token.
    assert {r.headers["authorization"] for r in server.requests} == {f"Bearer {API_KEY}"}
    assert len(server.requests) == 1 + 2 * 2  # one caption; 2 prompts x 1 sample x (concept, prompt)
    # Scores and the gate in the termination message; the detail in the output folder.
    scores = term["evaluation"]
    assert set(scores) == {"dino", "clipI", "clipT", "baseDino", "baseClipI", "baseClipT",
                           "conceptPreservation", "promptFollowing"}  # fmt: skip
    assert (scores["conceptPreservation"], scores["promptFollowing"]) == (1.0, 4.0)
    assert term["qualityGate"] == "failed"
    assert "below minScore 3" in term["qualityGateReason"]
    assert term["evaluationUri"] == f"file://{tmp_path}/out/evaluation"
    result = EvaluationResult.model_validate_json((tmp_path / "out" / "evaluation" / "result.json").read_text())
    assert result.quality_gate is QualityGate.FAILED
    assert [p.prompt for p in result.prompts] == ["a sks toy on the beach", "a red sks toy"]
    assert (tmp_path / "out" / "evaluation" / "grid.png").is_file()
    assert json.loads((tmp_path / "out" / "evaluation.json").read_text()) == pytest.approx(scores, abs=1e-6)
    assert json.loads((tmp_path / "out" / "result.json").read_text())["qualityGate"] == "failed"
    assert (tmp_path / "out" / "model" / "model_index.json").is_file()

    # `dreambooth evaluate DIR` evaluates the exported model again: the same samples, so the same scores.
    (tmp_path / "out" / "evaluation.json").unlink()
    before = len(server.requests)
    again = subprocess.run(
        [DREAMBOOTH, "evaluate", str(tmp_path / "out")],
        env={**os.environ, env.VLM_API_KEY: API_KEY},
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert again.returncode == 7, again.stdout + again.stderr  # the gate failed again
    assert "failed its quality gate" in again.stderr
    assert "conceptPreservation: 1\n" in again.stdout
    rescored = json.loads((tmp_path / "out" / "evaluation.json").read_text())
    assert rescored == pytest.approx(scores, abs=1e-4)
    assert len(server.requests) == before + 2 * 2  # the judge only: the captions are not written again


def test_an_unreachable_vlm_and_a_broken_evaluation_never_fail_the_job(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    _images(tmp_path / "images")
    config = _config(tmp_path, dead, referenceImages=f"file://{tmp_path}/no-such-references/")

    code, term, events = _train(tmp_path, config)

    assert code == 0, term
    assert term["status"] == "succeeded"
    # Captions fell back to the instance prompt, with the reason logged.
    assert (tmp_path / "images" / "img0.txt").read_text().strip() == "a photo of sks toy"
    [captions] = [e for e in events if e.get("event") == "captions"]
    assert captions["fallback"] == 2
    assert captions["reason"]
    # No reference images: the evaluation is reported as failed, the model is still there.
    assert "no images" in term["evaluationError"]
    assert "evaluation" not in term
    assert (tmp_path / "out" / "model" / "model_index.json").is_file()


def test_the_judge_is_unknown_when_the_vlm_is_unreachable(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    _images(tmp_path / "images")
    config = _config(tmp_path, dead, baseline=False)
    config["instanceImages"]["captions"] = "off"

    code, term, _events = _train(tmp_path, config)

    assert code == 0, term
    assert term["qualityGate"] == "unknown"
    assert term["qualityGateReason"]
    assert {"dino", "clipI", "clipT"} <= set(term["evaluation"])
    assert not {"conceptPreservation", "baseDino"} & set(term["evaluation"])
    assert not (tmp_path / "out" / "captions.json").exists()  # captions off: nothing to record


def test_termination_fields_fit_the_message_limit() -> None:
    result = EvaluationResult(
        trained=MetricScores(dino=0.123456789, clip_i=0.9, clip_t=0.3),
        base=MetricScores(dino=0.1, clip_i=0.8, clip_t=0.31),
        judge=JudgeScores(status=JudgeStatus.SCORED, concept_preservation=1.5, prompt_following=3.25),
        quality_gate=QualityGate.FAILED,
        quality_gate_reason="x" * 5000,
    )
    fields = termination_fields(result, "s3://bucket/out")
    assert fields["evaluation"]["dino"] == 0.123457
    assert len(fields["qualityGateReason"]) <= 300
    doc = {"status": "succeeded", "modelUri": "s3://bucket/out/model", "message": "m" * 3000, **fields}
    decoded = json.loads(encode_termination_message(doc))
    assert len(encode_termination_message(doc)) <= MAX_TERMINATION_BYTES
    assert decoded["evaluation"] == fields["evaluation"]
    assert decoded["qualityGate"] == "failed"


def test_caption_stage_does_nothing_unless_captions_are_auto(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    config = parse_job_config({**_config(tmp_path, "http://127.0.0.1:9/v1"), "evaluation": None})
    config.instance_images.captions = CaptionMode.SIDECAR

    class Log:
        def info(self, *_a: Any, **_k: Any) -> None:
            raise AssertionError("nothing to log")

    assert caption_stage(config, ObjectStore(), Log()) == {}
    assert not (tmp_path / "images" / "img0.txt").exists()


def test_the_preflight_check_does_not_want_sidecars_of_an_auto_job(tmp_path: Path) -> None:
    from dreambooth_trainer.preflight import check_images

    _images(tmp_path / "images")
    config = parse_job_config(_config(tmp_path, "http://127.0.0.1:9/v1"))
    assert check_images(config, ObjectStore()) == 2  # captions: auto, no .txt yet
    sidecar = config.model_copy(
        update={"instance_images": config.instance_images.model_copy(update={"captions": CaptionMode.SIDECAR})}
    )
    with pytest.raises(InvalidInputError, match=r"img0\.txt"):
        check_images(sidecar, ObjectStore())  # a sidecar job still needs its captions


class _Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def info(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    warning = info


def test_overwrite_captions_does_not_caption_again_on_a_resumed_attempt(server: FakeVlm, tmp_path: Path) -> None:
    """Attempt 0 captions every image and records what it trained on; a restarted attempt of the run keeps those
    captions (its checkpoint was trained on them), and captions again only an image whose sidecar changed."""
    _images(tmp_path / "images", 3)
    config = parse_job_config({**_config(tmp_path, server.base_url), "evaluation": None})
    config.instance_images.overwrite_captions = True
    (tmp_path / "images" / "img0.txt").write_text("a user's old caption of sks toy\n")  # overwritten by attempt 0
    store = ObjectStore()
    first = iter(["a sks toy on a red couch", "a sks toy in the snow", "a sks toy on a shelf", "a sks toy at night"])
    server.reset(lambda _body: vllm_reply(json.dumps({"caption": next(first)})))

    assert caption_stage(config, store, _Log()) == {"vlm": 3, "existing": 0, "fallback": 0}
    attempt0 = {i: (tmp_path / "images" / f"img{i}.txt").read_text() for i in range(3)}
    assert "a user's old caption of sks toy\n" not in attempt0.values()
    dataset = SimpleNamespace(
        instances=[SimpleNamespace(source=f"file://{tmp_path}/images/img{i}.png", caption=attempt0[i].strip())
                   for i in range(3)]
    )  # fmt: skip
    record_prompts(config, dataset, store)  # what the trainer does once the dataset is read
    (tmp_path / "images" / "img2.txt").write_text("edited by hand between attempts\n")

    log = _Log()
    assert caption_stage(config, store, log) == {"vlm": 1, "existing": 2, "fallback": 0}
    assert len(server.requests) == 4  # only img2 was captioned again
    assert [(tmp_path / "images" / f"img{i}.txt").read_text() for i in range(2)] == [attempt0[0], attempt0[1]]
    assert (tmp_path / "images" / "img2.txt").read_text() == "a sks toy at night\n"


def test_an_unreadable_record_means_captioning_again(server: FakeVlm, tmp_path: Path) -> None:
    _images(tmp_path / "images", 1)
    config = parse_job_config({**_config(tmp_path, server.base_url), "evaluation": None})
    config.instance_images.overwrite_captions = True
    (tmp_path / "images" / "img0.txt").write_text("a sks toy\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "captions.json").write_text("{not json")
    server.reset(lambda _body: vllm_reply(json.dumps({"caption": "a sks toy on a chair"})))
    log = _Log()

    assert caption_stage(config, ObjectStore(), log) == {"vlm": 1, "existing": 0, "fallback": 0}
    assert [e for e, _ in log.events] == ["training_prompts_unreadable", "captions"]


def test_rank0_progress_says_evaluating_during_the_evaluation(tmp_path: Path) -> None:
    config = parse_job_config(_config(tmp_path, "http://127.0.0.1:9/v1"))
    progress = Progress("eval", "ns", 0, 2)
    seen: list[TrainerPhase | None] = []

    class Unet:
        def parameters(self) -> Iterator[Any]:  # the evaluation's first look at the trained model
            seen.append(progress.state.document.phase)
            raise RuntimeError("no weights here")

    module = SimpleNamespace(unet=Unet())
    fabric = SimpleNamespace(global_rank=0, world_size=1)
    fields = evaluate_after_export(fabric, config, module, ObjectStore(), tmp_path, tmp_path, _Log(), progress=progress)

    assert seen == [TrainerPhase.EVALUATING]
    assert fields == {"evaluationError": "RuntimeError: no weights here"}
    assert b'dreambooth_trainer_phase{job="eval",namespace="ns",phase="Evaluating",rank="0"} 1.0' in (
        progress.metrics.exposition()
    )
