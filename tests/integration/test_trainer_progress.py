"""Live progress of a real `dreambooth-train` process: /progress, /metrics (promtool-valid, scraped by a real
Prometheus), /healthz, while it trains; then SIGTERM shows the Preempted phase in the termination message.

The trainer labels its metrics job/namespace/rank; the scrape uses honor_labels so they are kept as they are
(without it Prometheus renames them exported_job and exported_namespace).
"""

from __future__ import annotations

import json
import signal
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.infra.fixtures import PrometheusFactory
from tests.infra.processes import wait_until
from tests.infra.prometheus import run_promtool
from tests.infra.s3 import S3Server
from tests.integration.trainer_runs import TrainerRun, put_images, tiny_job


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback URL built by the test)
        return resp.status, resp.headers["Content-Type"], resp.read()


def _progress(run: TrainerRun) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(_get(f"http://127.0.0.1:{run.metrics_port}/progress")[2])
    return doc


@pytest.fixture
def bucket(s3: S3Server) -> str:
    name = s3.make_bucket()
    put_images(s3, name, "subject")
    return name


def test_live_progress_and_metrics_while_training(
    s3: S3Server, bucket: str, prometheus: PrometheusFactory, tmp_path: Path
) -> None:
    config = tiny_job(s3, bucket, "live", maxSteps=400, checkpoint={"intervalSteps": 5, "intervalSeconds": None})
    run = TrainerRun(config, tmp_path, s3.env())
    try:
        base = f"http://127.0.0.1:{run.metrics_port}"
        run.wait_event(lambda e: e.get("event") == "progress_server", "progress server")
        assert _get(base + "/healthz")[2] == b"ok\n"
        run.wait_event(lambda e: e.get("event") == "checkpoint_written" and e["step"] >= 5, "a checkpoint")

        doc = _progress(run)
        assert doc["phase"] in ("Training", "Checkpointing")
        assert doc["totalSteps"] == 400
        assert doc["step"] >= 5
        assert doc["loss"] > 0
        assert doc["stepsPerSecond"] > 0
        assert doc["etaSeconds"] > 0
        assert doc["lastCheckpoint"]["step"] >= 5
        assert doc["lastCheckpoint"]["uri"].startswith(f"s3://{bucket}/live/checkpoints/step-")
        wait_until(lambda: _progress(run)["step"] > doc["step"], what="the step to advance", timeout=60)

        _, ctype, body = _get(base + "/metrics")
        assert ctype.startswith("text/plain; version=0.0.4")
        check = run_promtool("check", "metrics", input=body.decode())
        assert check.returncode == 0, check.stdout + check.stderr

        prom = prometheus(
            scrape_configs=[
                {
                    "job_name": "trainer",
                    "honor_labels": True,
                    "static_configs": [{"targets": [f"127.0.0.1:{run.metrics_port}"]}],
                }
            ]
        )
        sel = 'job="live",namespace="tests",rank="0"'
        prom.wait_for(f"dreambooth_trainer_step{{{sel}}} > 5", timeout=90)
        prom.wait_for(f"dreambooth_trainer_total_steps{{{sel}}} == 400")
        prom.wait_for(f"dreambooth_trainer_checkpoints_total{{{sel}}} >= 1")
        prom.wait_for(f"dreambooth_trainer_checkpoint_bytes_total{{{sel}}} > 0")
        prom.wait_for(f"dreambooth_trainer_checkpoint_stall_seconds_count{{{sel}}} >= 1")
        prom.wait_for(f"dreambooth_trainer_loss{{{sel}}} > 0")
        prom.wait_for(f"dreambooth_trainer_steps_per_second{{{sel}}} > 0")
        prom.wait_for(f"dreambooth_trainer_images_per_second{{{sel}}} > 0")
        prom.wait_for(f'dreambooth_trainer_phase{{{sel},phase="Training"}} == 1')
        # Two scrapes apart, the step counter moved: the values are live.
        first = float(prom.query(f"dreambooth_trainer_step{{{sel}}}")[0]["value"][1])
        prom.wait_for(f"dreambooth_trainer_step{{{sel}}} > {first}", timeout=60)
    finally:
        run.signal(signal.SIGTERM)
    assert run.wait() == 12, run._details()
    term = run.termination()
    assert term["status"] == "preempted"
    assert term["steps"] < 400
