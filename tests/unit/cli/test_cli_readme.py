"""The README stays true: its make targets, files, `dreambooth` command lines and kubectl short names exist."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import typer.main

from dreambooth_api import constants as api
from dreambooth_cli.app import app
from dreambooth_cli.client import DreamBoothClient
from tests.infra.paths import ROOT

README = (ROOT / "README.md").read_text()


def code_lines() -> list[str]:
    """Command lines of the README's sh code blocks, without trailing comments."""
    lines = []
    for block in re.findall(r"```sh\n(.*?)```", README, flags=re.DOTALL):
        for line in block.splitlines():
            command = re.split(r"\s#\s", line)[0].strip()
            if command:
                lines.append(command)
    return lines


def test_make_targets_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z0-9-]*):", makefile, flags=re.MULTILINE))
    used = set(re.findall(r"`make ([a-z0-9-]+)", README)) | {
        line.split()[1] for line in code_lines() if line.startswith("make ")
    }
    assert used, "the README names no make targets"
    assert used <= targets, used - targets
    assert {"demo", "test"} <= used


def test_linked_files_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)\)", README)
    mentioned = re.findall(r"`((?:examples|docs|images|charts|tests)/[\w./-]+)`", README)
    for path in [*links, *mentioned]:
        if "://" in path or "<" in path:
            continue
        assert (ROOT / path).exists(), path


@pytest.mark.parametrize("line", [ln for ln in code_lines() if ln.startswith("dreambooth ")])
def test_dreambooth_command_lines_parse(line: str) -> None:
    """Each command line resolves to a command whose options and arguments parse (nothing runs)."""
    group = typer.main.get_command(app)
    args = shlex.split(line)[1:]
    ctx = group.make_context("dreambooth", list(args), resilient_parsing=False)
    name, command, rest = group.resolve_command(ctx, ctx.protected_args + ctx.args)
    assert command is not None, line
    command.make_context(name or "", list(rest), parent=ctx)


def test_the_python_example_is_five_lines_of_the_client() -> None:
    """The README's Python block compiles, uses only DreamBoothClient's public methods, and is five lines after
    its import (tests/integration/test_client_readme.py runs it against a real API server)."""
    (block,) = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
    compile(block, "README.md", "exec")
    body = [ln for ln in block.splitlines() if ln.strip() and not ln.startswith(("from ", "import "))]
    assert len(body) == 5, body
    assert "from dreambooth_cli.client import DreamBoothClient" in block
    for method in re.findall(r"client\.(\w+)\(", block):
        assert callable(getattr(DreamBoothClient, method, None)), method


OTHER_RESOURCES = frozenset({"pods", "jobs", "events", "nodes", "workloads", "clusterqueues", "localqueues"})
"""Kubernetes' and Kueue's resources the README lists (not ours)."""


def test_kubectl_short_names_exist() -> None:
    for short in re.findall(r"kubectl get (\w+)", README):
        assert short in (*api.JOB_SHORT_NAMES, *api.INFERENCE_SHORT_NAMES, *OTHER_RESOURCES), short


def test_every_cli_command_is_documented() -> None:
    group = typer.main.get_command(app)
    assert isinstance(group.commands, dict)
    for name, command in group.commands.items():
        if not command.hidden:
            assert f"dreambooth {name}" in README, name


def test_helm_install_line_renders() -> None:
    """The README's `helm install` renders with the same release, chart and namespace (`helm template`)."""
    (line,) = [ln for ln in code_lines() if ln.startswith("helm install ")]
    args = shlex.split(line)[2:]
    helm = shutil.which("helm") or str(ROOT / ".tools/bin/helm")
    assert Path(helm).exists(), "helm is missing: make binaries"
    rendered = subprocess.run(
        [helm, "template", *[a for a in args if a != "--create-namespace"]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    assert "kind: Deployment" in rendered.stdout
