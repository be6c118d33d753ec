"""The self-contained HTML report of a training run (inline SVG plots, base64-embedded samples)."""

from __future__ import annotations

from dreambooth_cli.report.data import RunData, load_run
from dreambooth_cli.report.render import render_report, write_report

__all__ = ["RunData", "load_run", "render_report", "write_report"]
