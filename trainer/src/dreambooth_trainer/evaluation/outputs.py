"""The files an evaluation writes into its output folder (which the trainer uploads to `<output.uri>/`).

evaluation.json                 the flat scores, name -> number (docs/contracts.md, "Evaluation scores")
evaluation/result.json          the whole EvaluationResult: per-prompt detail, seeds, judge reasons, the gate
evaluation/grid.png             rows: prompts; columns: the trained model's samples, a gap, the base model's
evaluation/trained/p00-i0.png   sample 0 of prompt 0 of the trained model
evaluation/base/p00-i0.png      the same prompt and seed from the base model
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from PIL import Image

from dreambooth_api.evaluation import EvaluationResult

EVALUATION_FILE = "evaluation.json"
FOLDER = "evaluation"
RESULT_FILE = f"{FOLDER}/result.json"
GRID_FILE = f"{FOLDER}/grid.png"
# Grid tiles are at most this many pixels wide (25 prompts x 8 samples at 512 px would be a 100-megapixel PNG).
MAX_TILE = 256
GAP = 8
BACKGROUND = (255, 255, 255)

Which = Literal["trained", "base"]


def sample_name(which: Which, prompt: int, image: int) -> str:
    """A sample's path relative to the output folder."""
    return f"{FOLDER}/{which}/p{prompt:02d}-i{image}.png"


def write_samples(output_dir: Path, which: Which, samples: Sequence[Sequence[Image.Image]]) -> list[list[str]]:
    """Write `samples[prompt][image]` as PNGs; returns their relative paths in the same shape."""
    names: list[list[str]] = []
    for p, images in enumerate(samples):
        row = []
        for i, image in enumerate(images):
            name = sample_name(which, p, i)
            path = Path(output_dir) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            image.save(path, format="PNG")
            row.append(name)
        names.append(row)
    return names


def make_grid(
    trained: Sequence[Sequence[Image.Image]],
    base: Sequence[Sequence[Image.Image]] | None = None,
    max_tile: int = MAX_TILE,
) -> Image.Image:
    """One row per prompt: its trained samples, then (after a gap) its base samples, as square tiles."""
    all_images = [img for rows in (trained, base or []) for row in rows for img in row]
    if not all_images:
        raise ValueError("make_grid needs at least one image")
    tile = min(max_tile, max(max(img.size) for img in all_images))
    left = max((len(row) for row in trained), default=0)
    right = max((len(row) for row in base), default=0) if base else 0
    width = (left + right) * tile + (GAP if right else 0)
    grid = Image.new("RGB", (width, len(trained) * tile), BACKGROUND)
    for r, row in enumerate(trained):
        for c, img in enumerate(row):
            grid.paste(img.convert("RGB").resize((tile, tile)), (c * tile, r * tile))
        if base:
            for c, img in enumerate(base[r]):
                grid.paste(img.convert("RGB").resize((tile, tile)), ((left + c) * tile + GAP, r * tile))
    return grid


def write_grid(output_dir: Path, grid: Image.Image) -> str:
    path = Path(output_dir) / GRID_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path, format="PNG")
    return GRID_FILE


def write_result(output_dir: Path, result: EvaluationResult) -> None:
    """Write `evaluation/result.json` (everything) and `evaluation.json` (the flat scores)."""
    out = Path(output_dir)
    (out / RESULT_FILE).parent.mkdir(parents=True, exist_ok=True)
    (out / RESULT_FILE).write_text(json.dumps(result.to_wire(), indent=2, sort_keys=True) + "\n")
    (out / EVALUATION_FILE).write_text(json.dumps(result.scores(), indent=2, sort_keys=True) + "\n")
