"""`kubectl explain` text (issue 20): the CRDs' descriptions come from docstrings wrapped at 120 columns, and a kept
line break broke sentences in the middle; they are joined into paragraphs. And the InferenceService's columns, which
answer "why" as the DreamBoothJob's do."""

from __future__ import annotations

import pytest

from dreambooth_api.generate import INFERENCE_COLUMNS, crds, paragraphs
from dreambooth_api.schema import walk


@pytest.mark.parametrize(
    ("text", "joined"),
    [
        ("one line", "one line"),
        ("a sentence that\nwas wrapped here.", "a sentence that was wrapped here."),
        ("first paragraph\nwrapped.\n\nsecond one.", "first paragraph wrapped.\n\nsecond one."),
        ("a list:\n- one\n  more of one\n- two", "a list:\n- one more of one\n- two"),
        ("  indented\n    continuation  ", "indented continuation"),
    ],
)
def test_paragraphs(text: str, joined: str) -> None:
    assert paragraphs(text) == joined


def test_no_description_breaks_a_line_inside_a_paragraph() -> None:
    found = 0
    for crd in crds():
        root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
        for path, node in walk(root):
            text = node.get("description")
            if not isinstance(text, str):
                continue
            found += 1
            for paragraph in text.split("\n\n"):
                lines = paragraph.split("\n")
                assert all(line.startswith("- ") for line in lines[1:]), (path, text)
    assert found > 100


def test_the_inference_columns_are_pinned() -> None:
    assert [(c["name"], c["jsonPath"], c.get("priority", 0)) for c in INFERENCE_COLUMNS] == [
        ("Phase", ".status.phase", 0),
        ("Reason", ".status.reason", 0),
        ("Ready", ".status.readyReplicas", 0),
        ("URL", ".status.url", 0),
        ("Model", ".status.servedModelUri", 0),
        ("Age", ".metadata.creationTimestamp", 0),
        ("Message", ".status.message", 1),
    ]
