"""The trainer's stdout: one JSON object per line (docs/contracts.md, Logs). Pure parsing and progress state."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from dreambooth_api.progress import ProgressError, parse_progress

STEP_EVENT = "step"


def parse_line(line: str) -> dict[str, Any] | None:
    """The JSON object on a line, or None for anything else (the trainer's libraries print plain text too)."""
    text = line.strip()
    if not text.startswith("{"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Progress:
    """What the CLI shows of a job's progress: the latest `step` event of the trainer's log (or a DreamBoothJob's
    status.progress). A step event carries the fields of the `/progress` document, read by the contract's parser."""

    step: int = 0
    total_steps: int | None = None
    loss: float | None = None
    lr: float | None = None
    steps_per_second: float | None = None
    eta_seconds: float | None = None
    phase: str | None = None

    def update(self, event: dict[str, Any]) -> bool:
        """Apply a step event or a /progress-like document; True when it carried progress."""
        if event.get("event") not in (None, STEP_EVENT):
            return False
        try:
            doc = parse_progress(event)
        except ProgressError:
            return False
        self.step = doc.step
        if doc.total_steps:
            self.total_steps = doc.total_steps
        self.loss, self.lr = doc.loss, doc.lr
        self.steps_per_second, self.eta_seconds = doc.steps_per_second, doc.eta_seconds
        if isinstance(event.get("phase"), str):
            self.phase = event["phase"]
        return True

    def describe(self) -> str:
        """One plain line: `step 12/40 loss 0.1234 lr 1e-04 3.10 it/s eta 9s`."""
        parts = [f"step {self.step}/{self.total_steps}" if self.total_steps else f"step {self.step}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:.4f}")
        if self.lr is not None:
            parts.append(f"lr {self.lr:.2e}")
        if self.steps_per_second is not None:
            parts.append(f"{self.steps_per_second:.2f} it/s")
        if self.eta_seconds is not None:
            parts.append(f"eta {self.eta_seconds:.0f}s")
        return " ".join(parts)


NOTABLE_EVENTS = frozenset({"resumed", "checkpoint_written", "checkpoint", "validation", "exported", "preempted"})


def is_notable(event: dict[str, Any]) -> bool:
    """Events worth a line of their own above the progress bar: warnings, errors and milestones."""
    return event.get("level") in ("warning", "error", "critical") or event.get("event") in NOTABLE_EVENTS


def evaluation_note(event: dict[str, Any]) -> str | None:
    """A line for the trainer's evaluation after the export (sampling and scoring take minutes on a real model, with
    the training bar finished): its start, each stage's first and last item, its scores; "" for an evaluation event
    not worth a line (a stage's middle items); None for any other event."""
    name = event.get("event")
    if name == "evaluation_started":
        return f"evaluating: {event.get('prompts')} prompt(s) x {event.get('imagesPerPrompt')} image(s)"
    if name == "evaluation_progress":
        done, total = event.get("done"), event.get("total")
        return f"evaluating: {event.get('stage')} {done}/{total}" if done in (1, total) else ""
    if name == "evaluation":
        raw = event.get("scores")
        scores: dict[str, Any] = raw if isinstance(raw, dict) else {}
        shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(scores.items()))
        return f"evaluated: {shown or 'no scores'}; quality gate {event.get('qualityGate')}"
    return None


def describe_event(event: dict[str, Any]) -> str:
    details = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("ts", "level", "event"))
    return f"[{event.get('level', 'info')}] {event.get('event', '')} {details}".rstrip()


def format_log_event(event: dict[str, Any]) -> str:
    """One trainer log line for people: `12:03:04 info step step=12 loss=0.1234` (time of day in UTC)."""
    ts = event.get("ts")
    clock = ts[11:19] if isinstance(ts, str) and len(ts) >= 19 else ""
    details = " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
        for k, v in event.items()
        if k not in ("ts", "level", "event")
    )
    return " ".join(
        part for part in (clock, str(event.get("level", "info")), str(event.get("event", "")), details) if part
    )
