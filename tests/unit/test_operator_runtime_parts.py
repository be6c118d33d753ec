"""Small pure parts of the operator runtime: settings, merge patches, /progress URL, metrics, CLI flags."""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from dreambooth_operator.kube import merge_diff
from dreambooth_operator.main import parse_args
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import progress_url
from dreambooth_operator.settings import OperatorSettings


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_NAMESPACES", '["a","b"]')
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS", "2.5")
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_TRAINER_IMAGE", "x/trainer:1")
    settings = OperatorSettings()
    assert settings.namespaces == ["a", "b"]
    assert settings.reconcile_interval_seconds == 2.5
    assert settings.trainer_image == "x/trainer:1"
    assert settings.log_format == "json"


def test_flags_override_the_environment() -> None:
    assert parse_args(["--standalone", "-n", "a", "--namespace", "b", "--log-format", "plain"]) == {
        "standalone": True,
        "namespaces": ["a", "b"],
        "log_format": "plain",
    }
    assert parse_args([]) == {}


@pytest.mark.parametrize(
    ("old", "new", "patch"),
    [
        ({"a": 1}, {"a": 1}, {}),
        ({"a": 1}, {"a": 2}, {"a": 2}),
        ({"a": 1, "b": 2}, {"a": 1}, {"b": None}),
        ({"p": {"x": 1, "loss": 0.5}}, {"p": {"x": 2}}, {"p": {"x": 2, "loss": None}}),
        ({"c": [1, 2]}, {"c": [1]}, {"c": [1]}),
        ({"kopf": {"dummy": 1}}, {"a": 1}, {"a": 1}),
        (None, {"a": {"b": 1}}, {"a": {"b": 1}}),
    ],
)
def test_merge_diff(old: dict[str, object] | None, new: dict[str, object], patch: dict[str, object]) -> None:
    assert merge_diff(old, new, keep=frozenset({"kopf"})) == patch


def test_progress_url() -> None:
    assert progress_url("127.10.0.2") == "http://127.10.0.2:8080/progress"
    assert progress_url("fd00::5", 9000) == "http://[fd00::5]:9000/progress"


def test_jobs_by_phase_gauge() -> None:
    metrics = OperatorMetrics()
    metrics.set_phase("ns", "a", "Running")
    metrics.set_phase("ns", "b", "Running")
    metrics.set_phase("ns", "a", "Succeeded")
    metrics.set_phase("ns", "c", "Failed")
    metrics.set_phase("ns", "c", None)
    text = generate_latest(metrics.registry).decode()
    assert 'dreambooth_operator_jobs{phase="Running"} 1.0' in text
    assert 'dreambooth_operator_jobs{phase="Succeeded"} 1.0' in text
    assert 'dreambooth_operator_jobs{phase="Failed"} 0.0' in text
