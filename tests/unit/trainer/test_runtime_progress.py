"""The progress server's endpoints, the result/termination message, SIGTERM handling and JSON log lines."""

from __future__ import annotations

import io
import json
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dreambooth_api.progress import TrainerPhase, parse_progress
from dreambooth_trainer.logging import EventLog
from dreambooth_trainer.preemption import Preemption
from dreambooth_trainer.progress import ActiveSeconds, Progress, ProgressServer, RateMeter
from dreambooth_trainer.result import RunResult, encode_termination_message, write_termination_message


def _get(url: str) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (loopback URL built by the test)
        return resp.status, resp.headers["Content-Type"], resp.read()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_server_reports_live_values_on_every_endpoint() -> None:
    progress = Progress("job-a", "ns1", rank=0, total_steps=10)
    server = ProgressServer(progress, host="127.0.0.1", port=0).start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert _get(base + "/healthz")[0] == 200
        progress.set_phase(TrainerPhase.TRAINING)
        progress.on_step(1, loss=0.5, lr=1e-4, images=2, data_wait=0.25)
        progress.on_step(2, loss=0.4, lr=2e-4, images=2, data_wait=0.25)
        progress.on_stall(0.02)
        progress.on_checkpoint(2, "s3://b/ck/step-00000002", "2026-11-27T00:00:00Z", 1234, 0.7)
        _, ctype, body = _get(base + "/progress")
        assert ctype == "application/json"
        doc = json.loads(body)
        assert doc["phase"] == "Training"
        assert (doc["step"], doc["totalSteps"], doc["loss"]) == (2, 10, 0.4)
        assert doc["stepsPerSecond"] > 0
        assert doc["etaSeconds"] == pytest.approx(8 / doc["stepsPerSecond"])
        assert doc["lastCheckpoint"] == {"step": 2, "uri": "s3://b/ck/step-00000002", "time": "2026-11-27T00:00:00Z"}
        assert doc["resumedFrom"] is None  # started from step 0
        assert parse_progress(body) == progress.state.document  # the contract's document, read as the operator does
        _, ctype, body = _get(base + "/metrics")
        assert ctype.startswith("text/plain")
        s = _samples(body.decode())
        labels = (("job", "job-a"), ("namespace", "ns1"), ("rank", "0"))
        assert s[("dreambooth_trainer_step", labels)] == 2
        assert s[("dreambooth_trainer_loss", labels)] == 0.4
        assert s[("dreambooth_trainer_learning_rate", labels)] == 2e-4
        assert s[("dreambooth_trainer_data_wait_seconds_total", labels)] == 0.5
        assert s[("dreambooth_trainer_checkpoints_total", labels)] == 1
        assert s[("dreambooth_trainer_checkpoint_bytes_total", labels)] == 1234
        assert s[("dreambooth_trainer_checkpoint_stall_seconds_count", labels)] == 1
        assert s[("dreambooth_trainer_phase", (*labels[:2], ("phase", "Training"), labels[2]))] == 1
        assert s[("dreambooth_trainer_phase", (*labels[:2], ("phase", "Exporting"), labels[2]))] == 0
        with pytest.raises(urllib.error.HTTPError):
            _get(base + "/nope")
    finally:
        server.stop()


def test_progress_names_the_checkpoint_step_it_resumed_from() -> None:
    progress = Progress("job-a", "ns1", rank=0, total_steps=10)
    progress.on_resume(6)
    progress.on_step(7, loss=0.5, lr=1e-4, images=2, data_wait=0.0)
    doc = progress.state.to_wire()
    assert (doc["step"], doc["resumedFrom"]) == (7, 6)


def test_rate_meter_window() -> None:
    m = RateMeter(window=2)
    assert m.rates() == (None, None)
    for t in (0.0, 1.0, 2.0, 4.0):
        m.tick(3, now=t)
    sps, ips = m.rates()
    assert sps == pytest.approx(2 / 3)  # last 3 ticks: 2 steps in 3 s
    assert ips == pytest.approx(6 / 3)


def test_termination_message_fits_4k_and_keeps_the_fields() -> None:
    doc = RunResult(status="failed", reason="InvalidInput", message='é"' * 5000, steps=3).to_wire()
    data = encode_termination_message(doc)
    assert len(data) <= 4096
    parsed = json.loads(data)
    assert parsed["status"] == "failed"
    assert parsed["reason"] == "InvalidInput"
    assert parsed["steps"] == 3
    assert parsed["message"].endswith("...")
    short = RunResult(status="succeeded", steps=5, final_loss=0.1, duration_seconds=1.23456).to_wire()
    assert json.loads(encode_termination_message(short)) == {
        "status": "succeeded",
        "steps": 5,
        "finalLoss": 0.1,
        "durationSeconds": 1.235,
    }


def test_write_termination_message_env_and_unwritable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "term"
    monkeypatch.setenv("TERMINATION_MESSAGE_PATH", str(path))
    assert write_termination_message({"status": "preempted"})
    assert json.loads(path.read_text()) == {"status": "preempted"}
    assert not write_termination_message({"status": "x"}, str(tmp_path / "missing" / "dir" / "f"))


def test_sigterm_sets_the_flag_and_a_deadline() -> None:
    with Preemption(grace=10) as p:
        assert not p.requested
        before = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not p.requested and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.requested
        assert p.signal_name == "SIGTERM"
        assert before + 6 < p.deadline() <= time.monotonic() + 7  # grace 10 minus the 3 s exit margin
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_event_log_lines_are_json_with_context() -> None:
    buf = io.StringIO()
    log = EventLog(buf, rank=0)
    log.bind(attempt=2)
    log.info("step", step=3, loss=float("nan"))
    log.warning("x")
    first, second = (json.loads(x) for x in buf.getvalue().splitlines())
    assert first["event"] == "step"
    assert first["level"] == "info"
    assert first["rank"] == 0
    assert first["attempt"] == 2
    assert first["loss"] is None
    assert first["ts"].endswith("Z")
    assert second["level"] == "warning"


def test_active_seconds_count_only_the_phases_that_hold_the_gpu_and_grow_between_scrapes() -> None:
    now = [100.0]
    active = ActiveSeconds({"job": "j", "namespace": "n", "rank": "0"}, clock=lambda: now[0])
    assert active.seconds() == 0
    active.phase(TrainerPhase.INITIALIZING)
    now[0] = 103.0
    assert active.seconds() == 3  # read mid-phase: a scrape sees time still running
    active.phase(TrainerPhase.TRAINING)  # active to active: the clock keeps running
    now[0] = 110.0
    active.phase(TrainerPhase.PREEMPTED)
    now[0] = 500.0
    assert active.seconds() == 10  # its last words do not count
    active.phase(TrainerPhase.EXPORTING)
    now[0] = 502.5
    active.phase(TrainerPhase.EVALUATING)  # the evaluation samples on the GPU too
    now[0] = 506.5
    active.phase(TrainerPhase.SUCCEEDED)
    now[0] = 600.0
    (family,) = active.collect()
    assert family.name == "dreambooth_trainer_active_seconds"
    assert [(s.name, s.labels, s.value) for s in family.samples] == [
        ("dreambooth_trainer_active_seconds_total", {"job": "j", "namespace": "n", "rank": "0"}, 16.5)
    ]
