"""The CLI and evaluation: `watch` and `status` exit 7 on QualityGateFailed (0 when the gate passed), `status` shows
the scores and the gate, and `report` fetches the evaluation's files from storage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from dreambooth_cli import kube, present, s3
from dreambooth_cli.app import main
from dreambooth_cli.errors import ExitStatus
from dreambooth_cli.jobinfo import JobInfo

SCORES = {"dino": 0.61234, "clipI": 0.8, "clipT": 0.3, "conceptPreservation": 1.5, "promptFollowing": 3.5}


def job(gate: str | None) -> dict[str, Any]:
    conditions: list[dict[str, Any]] = [{"type": "Succeeded", "status": "True", "reason": "TrainingCompleted"}]
    outputs: dict[str, Any] = {"modelUri": "s3://m", "evaluation": SCORES, "score": SCORES["dino"]}
    if gate is not None:
        outputs |= {"qualityGate": gate, "qualityGateReason": "conceptPreservation 1.50 below minScore 2"}
        conditions.append(
            {
                "type": "QualityGateFailed",
                "status": "True" if gate == "failed" else "False",
                "reason": "ScoreBelowMinimum" if gate == "failed" else "QualityGatePassed",
                "message": "conceptPreservation 1.50 below minScore 2",
            }
        )
    return {
        "metadata": {"name": "toy", "namespace": "ns"},
        "spec": {"training": {"maxSteps": 20}},
        "status": {"phase": "Succeeded", "conditions": conditions, "outputs": outputs},
    }


def _serve(monkeypatch: pytest.MonkeyPatch, obj: dict[str, Any]) -> None:
    target = kube.Target(client.ApiClient(client.Configuration()), "ns", "https://127.0.0.1:1")
    monkeypatch.setattr(kube, "connect", lambda *_: target)
    monkeypatch.setattr(kube, "get_job", lambda *_: obj)
    monkeypatch.setattr(time, "sleep", lambda _s: None)


@pytest.mark.parametrize("command", ["watch", "status"])
def test_a_failed_quality_gate_exits_7(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(monkeypatch, job("failed"))
    with pytest.raises(SystemExit) as exit_:
        main([command, "toy"])
    assert exit_.value.code == ExitStatus.QUALITY_GATE_FAILED
    assert int(ExitStatus.QUALITY_GATE_FAILED) == 7
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: toy failed its quality gate: conceptPreservation 1.50 below minScore 2"


@pytest.mark.parametrize("gate", [None, "passed", "unknown"])
def test_watch_exits_0_without_a_failed_gate(
    gate: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _serve(monkeypatch, job(gate))
    main(["watch", "toy"])
    assert "toy succeeded; model: s3://m" in capsys.readouterr().out


def test_quality_gate_failed_reads_the_condition() -> None:
    assert JobInfo.from_object(job("failed")).quality_gate_failed == "conceptPreservation 1.50 below minScore 2"
    assert JobInfo.from_object(job("passed")).quality_gate_failed is None
    assert JobInfo.from_object(job(None)).quality_gate_failed is None


def test_status_rows_show_the_scores_and_the_gate() -> None:
    rows = dict(present.detail_rows(job("failed")))
    assert rows["evaluation dino"] == "0.6123"
    assert rows["evaluation conceptPreservation"] == "1.5"
    assert rows["quality gate"] == "failed: conceptPreservation 1.50 below minScore 2"


class FakeS3:
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys
        self.downloaded: list[str] = []

    def get_paginator(self, _name: str) -> Any:
        keys = self.keys

        class Paginator:
            def paginate(self, **_kw: Any) -> list[dict[str, Any]]:
                return [{"Contents": [{"Key": k} for k in keys]}]

        return Paginator()

    def download_file(self, _bucket: str, key: str, local: str) -> None:
        self.downloaded.append(key)
        Path(local).write_text("{}")


def test_report_downloads_the_evaluation_files(tmp_path: Any) -> None:
    keys = ["out/evaluation.json", "out/evaluation/result.json", "out/evaluation/grid.png", "out/captions.json",
            "out/evaluation/trained/p00-i0.png", "out/model/unet/x.safetensors"]  # fmt: skip
    fake = FakeS3(keys)
    s3.download_run(fake, "s3://bucket/out", tmp_path)  # type: ignore[arg-type]
    assert sorted(fake.downloaded) == sorted(keys[:4])
    assert (tmp_path / "evaluation" / "grid.png").is_file()


def test_evaluate_refuses_a_folder_that_is_no_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["evaluate", str(tmp_path)])
    assert exit_.value.code == ExitStatus.INVALID_INPUT
    assert "no config.json" in capsys.readouterr().err
