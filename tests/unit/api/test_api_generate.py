"""Drift: the committed CRDs, chart CRDs and docs/api.md equal what the generator makes from the models."""

from __future__ import annotations

from pathlib import Path

import pytest

from dreambooth_api.generate import CHART_CRD_DIR, CRD_DIR, DOCS_PATH, render_all, write_all
from tests.infra.paths import ROOT

GENERATED = render_all()


@pytest.mark.parametrize("rel", sorted(GENERATED), ids=str)
def test_committed_file_matches_generator(rel: Path) -> None:
    committed = ROOT / rel
    assert committed.is_file(), f"{rel} is missing: run `make crds`"
    assert committed.read_text() == GENERATED[rel], f"{rel} drifted from the models: run `make crds`"


def test_no_stale_generated_files() -> None:
    for folder in (CRD_DIR, CHART_CRD_DIR):
        expected = {p.name for p in GENERATED if p.parent == folder}
        assert {p.name for p in (ROOT / folder).glob("*.yaml")} == expected


def test_chart_carries_the_same_crds() -> None:
    for rel, text in GENERATED.items():
        if rel.parent == CRD_DIR:
            assert GENERATED[CHART_CRD_DIR / rel.name] == text


def test_generation_is_idempotent(tmp_path: Path) -> None:
    first = write_all(tmp_path)
    assert set(first) == set(GENERATED)
    snapshot = {p: (tmp_path / p).read_bytes() for p in first}
    assert write_all(tmp_path) == []
    assert {p: (tmp_path / p).read_bytes() for p in first} == snapshot
    assert "## DreamBoothJob" in (tmp_path / DOCS_PATH).read_text()
