"""Kubeconfig resolution as kubectl does it: KUBECONFIG with several files, broken files, and in-cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from dreambooth_cli import kube
from dreambooth_cli.app import main
from dreambooth_cli.errors import CliError, ExitStatus

CLUSTER = 'clusters: [{name: c, cluster: {server: "https://127.0.0.1:1", insecure-skip-tls-verify: true}}]'
USERS = "users: [{name: u, user: {token: t}}]"


def kubeconfig(path: Path, contexts: dict[str, str | None], current: str | None) -> Path:
    """A kubeconfig with one cluster and user, the given contexts (name: namespace) and current-context."""
    entries = ", ".join(
        f"{{name: {name}, context: {{cluster: c, user: u{f', namespace: {ns}' if ns else ''}}}}}"
        for name, ns in contexts.items()
    )
    lines = ["apiVersion: v1", "kind: Config", CLUSTER, USERS, f"contexts: [{entries}]"]
    if current is not None:
        lines.append(f"current-context: {current}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    return {
        "broken": kubeconfig(tmp_path / "broken", {"x": "ml", "y": None}, "nosuch"),
        "ml": kubeconfig(tmp_path / "ml", {"x": "ml", "y": None}, "x"),
        "other": kubeconfig(tmp_path / "other", {"z": "other", "x": "shadowed"}, "z"),
        "unset": kubeconfig(tmp_path / "unset", {"w": "w-ns"}, None),
    }


def use(monkeypatch: pytest.MonkeyPatch, *paths: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join(str(p) for p in paths))


def test_the_first_file_that_sets_current_context_wins(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    use(monkeypatch, files["ml"], files["other"])
    assert kube.connect(None, None, None).namespace == "ml"
    use(monkeypatch, files["unset"], files["other"], files["ml"])
    assert kube.connect(None, None, None).namespace == "other"


def test_a_broken_current_context_in_a_later_file_is_ignored(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]
) -> None:
    use(monkeypatch, files["ml"], files["broken"])
    target = kube.connect(None, None, None)
    assert (target.namespace, target.host) == ("ml", "https://127.0.0.1:1")


def test_context_and_namespace_options_across_files(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    use(monkeypatch, files["ml"], files["other"])
    assert kube.connect(None, "z", None).namespace == "other"
    assert kube.connect(None, "y", None).namespace == "default"
    assert kube.connect(None, "x", None).namespace == "ml"  # the first file's context of that name
    assert kube.connect(None, "z", "team").namespace == "team"


def test_missing_files_in_kubeconfig_are_skipped(
    monkeypatch: pytest.MonkeyPatch, files: dict[str, Path], tmp_path: Path
) -> None:
    use(monkeypatch, tmp_path / "absent", files["other"])
    assert kube.connect(None, None, None).namespace == "other"


def test_a_broken_kubeconfig_reports_its_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], files: dict[str, Path]
) -> None:
    use(monkeypatch, files["broken"])
    with pytest.raises(SystemExit) as exit_:
        main(["list"])
    err = capsys.readouterr().err
    assert exit_.value.code == ExitStatus.NO_CLUSTER
    assert len(err.strip().splitlines()) == 1, err
    assert "nosuch" in err
    assert str(files["broken"]) in err
    assert "no cluster configured" not in err


def test_no_current_context_anywhere_says_so(monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    use(monkeypatch, files["unset"])
    with pytest.raises(CliError) as err:
        kube.connect(None, None, None)
    assert err.value.status == ExitStatus.NO_CLUSTER
    assert "no current-context" in err.value.message
    assert kube.connect(None, "w", None).namespace == "w-ns"


def test_invalid_yaml_names_the_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_text("clusters: [oops\n")
    use(monkeypatch, bad)
    with pytest.raises(CliError) as err:
        kube.connect(None, None, None)
    assert err.value.status == ExitStatus.NO_CLUSTER
    assert err.value.message.startswith(f"{bad}: unreadable kubeconfig")


def service_account(folder: Path, namespace: str) -> Path:
    folder.mkdir()
    (folder / "token").write_text("sa-token")
    (folder / "ca.crt").write_text("not checked until a connection is made")
    (folder / "namespace").write_text(namespace + "\n")
    return folder


def test_in_cluster_the_namespace_is_the_service_accounts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    use(monkeypatch, tmp_path / "no-such-kubeconfig")
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", service_account(tmp_path / "sa", "team-a"))
    environ = {"KUBECONFIG": str(tmp_path / "no-such-kubeconfig")}
    environ |= {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443"}
    target = kube.connect(None, None, None, environ)
    assert (target.namespace, target.host) == ("team-a", "https://10.0.0.1:443")
    assert kube.connect(None, None, "other", environ).namespace == "other"


def test_outside_a_cluster_without_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(kube, "SERVICE_ACCOUNT_DIR", tmp_path / "none")
    with pytest.raises(CliError) as err:
        kube.connect(None, None, None, {"KUBECONFIG": str(tmp_path / "absent")})
    assert err.value.status == ExitStatus.NO_CLUSTER
    assert err.value.message.startswith("no cluster configured")
