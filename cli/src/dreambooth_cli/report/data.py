"""Read a run's output folder (the object-storage layout of docs/contracts.md, on a local disk) into plain data.

Everything here is tolerant of a run in progress: missing files give empty sections, malformed lines are skipped.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

STEP_DIR = re.compile(r"^step-(\d+)$")
SAMPLE_FILE = re.compile(r"^p(\d+)-i(\d+)\.png$")
EVALUATION_FILE = "evaluation.json"
EVALUATION_RESULT = "evaluation/result.json"
EVALUATION_GRID = "evaluation/grid.png"


@dataclass(frozen=True)
class MetricPoint:
    step: int
    loss: float | None
    lr: float | None
    time: float | None
    """Seconds since the epoch, when the line had a time."""


@dataclass(frozen=True)
class Sample:
    prompt_index: int
    image_index: int
    path: Path


@dataclass(frozen=True)
class SampleStep:
    step: int
    samples: tuple[Sample, ...]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    path: Path
    complete: bool
    """True when the folder has its manifest.json (written last)."""
    size_bytes: int | None
    created: str | None


@dataclass
class RunData:
    """What a report shows; every part may be empty."""

    root: Path
    config: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    metrics: list[MetricPoint] = field(default_factory=list)
    samples: list[SampleStep] = field(default_factory=list)
    checkpoints: list[Checkpoint] = field(default_factory=list)
    evaluation: dict[str, float] = field(default_factory=dict)
    evaluation_grid: Path | None = None
    """evaluation/grid.png: each prompt's samples from the trained model, then from the base model."""
    quality_gate: str | None = None
    """`passed`, `failed`, `unknown` or `skipped` (evaluation/result.json), with its reason."""
    gpu_time: str | None = None
    """The job's GPU time over all pods and attempts (its status.usage, as `dreambooth status` shows it); a cluster
    job's report only."""

    @property
    def prompts(self) -> list[str]:
        validation = self.config.get("training", {}).get("validation", {})
        prompts = validation.get("prompts", []) if isinstance(validation, dict) else []
        return [str(p) for p in prompts] if isinstance(prompts, list) else []


def parse_time(value: Any) -> float | None:
    """A metrics time: epoch seconds (number) or an ISO 8601 string."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
        except ValueError:
            return None
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def parse_metrics(text: str) -> list[MetricPoint]:
    """Parse metrics.jsonl; the last line for a step wins (a resumed run repeats steps), sorted by step."""
    by_step: dict[int, MetricPoint] = {}
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            continue
        step = int(row["step"])
        by_step[step] = MetricPoint(step, _number(row.get("loss")), _number(row.get("lr")), parse_time(row.get("time")))
    return [by_step[s] for s in sorted(by_step)]


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a file; {} when it is missing, unreadable or not an object."""
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _step_dirs(parent: Path) -> list[tuple[int, Path]]:
    if not parent.is_dir():
        return []
    found = []
    for child in parent.iterdir():
        m = STEP_DIR.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return sorted(found)


def load_samples(samples_dir: Path) -> list[SampleStep]:
    steps = []
    for step, folder in _step_dirs(samples_dir):
        samples = []
        for png in folder.iterdir():
            m = SAMPLE_FILE.match(png.name)
            if m:
                samples.append(Sample(int(m.group(1)), int(m.group(2)), png))
        if samples:
            samples.sort(key=lambda s: (s.prompt_index, s.image_index))
            steps.append(SampleStep(step, tuple(samples)))
    return steps


def _manifest_size(manifest: dict[str, Any]) -> int | None:
    files = manifest.get("files")
    entries: list[Any]
    if isinstance(files, dict):
        entries = list(files.values())
    elif isinstance(files, list):
        entries = files
    else:
        return None
    sizes = [e.get("size") for e in entries if isinstance(e, dict)]
    ints = [s for s in sizes if isinstance(s, int)]
    return sum(ints) if ints else None


def load_checkpoints(checkpoints_dir: Path) -> list[Checkpoint]:
    result = []
    for step, folder in _step_dirs(checkpoints_dir):
        manifest_path = folder / "manifest.json"
        manifest = read_json(manifest_path) if manifest_path.is_file() else {}
        size = _manifest_size(manifest)
        if size is None:
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) or None
        created = manifest.get("time") or manifest.get("created")
        result.append(
            Checkpoint(step, folder, manifest_path.is_file(), size, str(created) if created is not None else None)
        )
    return result


def load_evaluation(root: Path) -> dict[str, float]:
    """Evaluation scores: evaluation.json (a map of name to number), or result.json's `evaluation`."""
    data = read_json(root / EVALUATION_FILE) or read_json(root / "result.json").get("evaluation", {})
    if not isinstance(data, dict):
        return {}
    return {str(k): float(v) for k, v in data.items() if _number(v) is not None}


def load_quality_gate(root: Path) -> str | None:
    """`<gate>: <reason>` from evaluation/result.json, or None when the run was not evaluated."""
    result = read_json(root / EVALUATION_RESULT)
    gate = result.get("qualityGate")
    if not isinstance(gate, str):
        return None
    reason = result.get("qualityGateReason")
    return f"{gate}: {reason}" if isinstance(reason, str) and reason else gate


def load_run(root: Path) -> RunData:
    """Load a run's output folder (holding metrics.jsonl, samples/, checkpoints/, config.json, result.json)."""
    metrics_path = root / "metrics.jsonl"
    return RunData(
        root=root,
        config=read_json(root / "config.json"),
        result=read_json(root / "result.json"),
        metrics=parse_metrics(metrics_path.read_text()) if metrics_path.is_file() else [],
        samples=load_samples(root / "samples"),
        checkpoints=load_checkpoints(root / "checkpoints"),
        evaluation=load_evaluation(root),
        evaluation_grid=root / EVALUATION_GRID if (root / EVALUATION_GRID).is_file() else None,
        quality_gate=load_quality_gate(root),
    )


def looks_like_run(root: Path) -> bool:
    return any((root / name).exists() for name in ("metrics.jsonl", "config.json", "result.json", "samples"))
