"""tests/infra/build-binaries.sh links Debian-installed tools (prometheus, promtool, chromium) into .tools/bin. The
Makefile puts .tools/bin first on PATH, so a second run must not find its own link and link it onto itself."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.infra.paths import TESTS

SCRIPT_DIR = TESTS / "infra"


def test_a_second_run_keeps_the_links_to_the_system_tools(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "tests" / "infra").mkdir(parents=True)
    for name in ("build-binaries.sh", "versions.env"):
        shutil.copy(SCRIPT_DIR / name, repo / "tests" / "infra" / name)
    system = tmp_path / "system-bin"  # stands in for /usr/bin, so nothing is installed
    system.mkdir()
    for tool in ("prometheus", "promtool"):
        (system / tool).write_text("#!/bin/sh\necho real\n")
        (system / tool).chmod(0o755)
    links = repo / ".tools" / "bin"
    env = {**os.environ, "PATH": f"{links}:{system}:{os.environ['PATH']}", "DBO_CACHE_DIR": str(tmp_path / "cache")}
    for _ in range(2):
        subprocess.run(
            ["bash", str(repo / "tests" / "infra" / "build-binaries.sh"), "prometheus"], env=env, check=True, timeout=60
        )
    for tool in ("prometheus", "promtool"):
        assert (links / tool).resolve() == system / tool
        assert subprocess.run([str(links / tool)], capture_output=True, text=True, check=True).stdout == "real\n"
