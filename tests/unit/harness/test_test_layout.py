"""The test tree's own rules: pytest imports test files by basename (rootdir-relative `prepend` import mode), so two
files with the same name in different tiers fail collection of the whole suite."""

from __future__ import annotations

from collections import Counter

from tests.infra.paths import TESTS


def test_every_test_file_has_a_unique_basename() -> None:
    names = Counter(p.name for p in TESTS.rglob("test_*.py"))
    assert names["test_test_layout.py"] == 1  # this file: the search found the tree
    assert [name for name, count in names.items() if count > 1] == []
