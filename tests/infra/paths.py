"""Where things are: the repository root and the folders the tests and the harness use (one definition)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parents[2]
"""The repository root."""
TESTS: Final = ROOT / "tests"
TOOLS_BIN: Final = ROOT / ".tools" / "bin"
"""Where `make binaries` links the test binaries."""
