"""Every command fails with one line on stderr and a distinct exit status; --debug adds the traceback."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from dreambooth_cli.app import main
from dreambooth_cli.errors import ExitStatus
from tests.infra.paths import ROOT

DEMO = ROOT / "examples" / "demo-job.yaml"


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    captured = capsys.readouterr()
    code = exit_.value.code
    return (code if isinstance(code, int) else 1), captured.out, captured.err


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    path = tmp_path / "kubeconfig"
    path.write_text(
        """apiVersion: v1
kind: Config
clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]
users: [{name: u, user: {token: t}}]
contexts: [{name: x, context: {cluster: c, user: u, namespace: ml}}]
current-context: x
"""
    )
    return path


def one_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def test_file_not_found(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "run", str(tmp_path / "missing.yaml"), "--local")
    assert code == ExitStatus.INVALID_INPUT
    assert one_line(err) == f"error: {tmp_path / 'missing.yaml'}: file not found"


def test_invalid_yaml_gives_the_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "job.yaml"
    bad.write_text("apiVersion: dreambooth.dev/v1alpha1\nkind: DreamBoothJob\nmetadata:\n  name: [x\n")
    code, _, err = run_main(capsys, "submit", str(bad))
    assert code == ExitStatus.INVALID_INPUT
    assert one_line(err).startswith(f"error: {bad}:5:1: invalid YAML:")


def test_schema_violation_names_the_field_and_the_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert any((ROOT / "crds").glob("*.yaml")), "crds/ holds no generated CRD (make crds)"
    job = tmp_path / "job.yaml"
    broken, replaced = re.subn(r"maxSteps: \d+", "maxSteps: 0", DEMO.read_text())
    assert replaced == 1
    job.write_text(broken)
    code, _, err = run_main(capsys, "run", str(job), "--local", "--workdir", str(tmp_path / "w"))
    assert code == ExitStatus.INVALID_INPUT
    line = one_line(err)
    assert "schema violation (CRD schema" in line
    assert "spec.training.maxSteps: 0 must be >= 1" in line


def test_no_cluster_reachable(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "list", "--kubeconfig", str(unreachable_kubeconfig(tmp_path)))
    assert code == ExitStatus.NO_CLUSTER
    assert one_line(err).startswith("error: no cluster reachable at https://127.0.0.1:1")


def test_missing_kubeconfig(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "status", "toy", "--kubeconfig", str(tmp_path / "nope"))
    assert code == ExitStatus.NO_CLUSTER
    assert "kubeconfig not found" in one_line(err)


def test_run_requires_local(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_main(capsys, "run", str(DEMO))
    assert code == ExitStatus.INVALID_INPUT
    assert "run needs --local" in one_line(err)


def test_report_of_an_empty_folder(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "report", str(tmp_path))
    assert code == ExitStatus.INVALID_INPUT
    assert "no run outputs here" in one_line(err)


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_main(capsys, "--debug", "run", str(tmp_path / "missing.yaml"), "--local")
    assert code == ExitStatus.INVALID_INPUT
    assert "Traceback" in err
    assert "file not found" in err


def test_console_scripts_show_help_under_both_names() -> None:
    bin_dir = Path(sys.executable).parent
    for script, prog in (("dreambooth", "dreambooth"), ("kubectl-dreambooth", "kubectl dreambooth")):
        result = subprocess.run(
            [str(bin_dir / script), "--help"], capture_output=True, text=True, check=False, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert f"Usage: {prog}" in result.stdout
        for command in ("run", "submit", "list", "status", "watch", "logs", "report"):
            assert command in result.stdout
