"""The Dockerfiles agree with the packages, the operator's settings and the Helm chart.

No Docker engine runs here: these tests read the files. They check that every command a Dockerfile runs is a
console script of our packages, that exposed ports are the ones the operator and the chart use, and that
default image names agree between the chart, the operator's settings and the images' labels.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml

from dreambooth_api import constants as api
from dreambooth_operator import settings
from dreambooth_operator.builders import TRAINER_GID
from tests.infra.paths import ROOT

IMAGES = {"operator": ROOT / "images/operator/Dockerfile", "trainer": ROOT / "images/trainer/Dockerfile"}
INSTALLS = {"operator": ("api", "operator"), "trainer": ("api", "trainer")}
"""The projects each image installs (the CLI, cli/, is installed on users' machines, in no image)."""
PROJECTS = ("api", "operator", "cli", "trainer")
CLI_ONLY_DEPENDENCIES = {"typer", "rich", "boto3"}
CHART = ROOT / "charts/dreambooth-operator"


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    joined: list[str] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined.append(pending + line)
        pending = ""
    result = []
    for line in joined:
        word, _, rest = line.partition(" ")
        result.append((word.upper(), rest.strip()))
    return result


def project(name: str) -> dict[str, Any]:
    data: dict[str, Any] = tomllib.loads((ROOT / name / "pyproject.toml").read_text())["project"]
    return data


def console_scripts(*projects: str) -> set[str]:
    scripts: set[str] = set()
    for name in projects or PROJECTS:
        scripts |= set(project(name).get("scripts", {}))
    return scripts


def dependency_names(name: str) -> set[str]:
    """The distribution names a project depends on (pins, extras and markers dropped), normalized."""
    names = set()
    for requirement in project(name)["dependencies"]:
        match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
        assert match is not None, requirement
        names.add(re.sub(r"[-_.]+", "-", match.group(0)).lower())
    return names


def commands_named(path: Path) -> set[str]:
    """Our commands that the image runs: dreambooth* words in RUN, CMD and ENTRYPOINT."""
    found: set[str] = set()
    for word, args in instructions(path):
        if word in ("RUN", "CMD", "ENTRYPOINT"):
            found |= set(re.findall(r"(?:^|[\s/\"\[])(dreambooth[a-z-]*)(?=[\s\"\],]|$)", args))
    return found


def entrypoint(path: Path) -> list[str]:
    (args,) = [a for w, a in instructions(path) if w == "ENTRYPOINT"]
    parsed = yaml.safe_load(args)
    assert isinstance(parsed, list), "ENTRYPOINT must use the exec form"
    return parsed


def exposed(path: Path) -> set[int]:
    return {int(p.split("/")[0]) for w, a in instructions(path) if w == "EXPOSE" for p in a.split()}


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_every_command_is_a_console_script(image: str) -> None:
    """Of the projects the image installs: the operator image has no `dreambooth` (the CLI's)."""
    named = commands_named(IMAGES[image])
    installed = console_scripts(*INSTALLS[image])
    assert named, "the Dockerfile runs none of our commands"
    assert named <= installed, named - installed


def test_the_operator_image_installs_only_what_the_operator_runs() -> None:
    """typer, rich and boto3 are the CLI's: neither the operator project nor its image has them."""
    assert not dependency_names("operator") & CLI_ONLY_DEPENDENCIES
    assert not dependency_names("api") & CLI_ONLY_DEPENDENCIES
    # dreambooth_api.vlm's openai is the api project's `vlm` extra: the trainer and the CLI have it, the operator not.
    assert "openai" not in dependency_names("api") | dependency_names("operator")
    assert "openai" in dependency_names("cli") & dependency_names("trainer")
    assert dependency_names("cli") >= {"dreambooth-api", *CLI_ONLY_DEPENDENCIES}
    assert not dependency_names("cli") & {"dreambooth-operator", "dreambooth-trainer", "torch"}
    assert {"dreambooth", "kubectl-dreambooth"} <= console_scripts("cli")
    assert not {"dreambooth", "kubectl-dreambooth"} & console_scripts("api", "operator", "trainer")
    copied = {a.split()[0] for w, a in instructions(IMAGES["operator"]) if w == "COPY" and not a.startswith("--")}
    assert "cli" not in copied
    installs = " ".join(a for w, a in instructions(IMAGES["operator"]) if w == "RUN")
    for module in ("torch", "openai", *CLI_ONLY_DEPENDENCIES):  # the build fails if any of them got installed
        assert f" {module}" in installs.partition("find_spec")[2], module


def test_every_dependency_is_pinned_as_in_the_lock() -> None:
    """Each project pins its third-party dependencies at the lock's versions (the lock is compiled from them)."""
    lock = dict(
        re.findall(r"^([a-z0-9][a-z0-9._-]*)==(\S+)", (ROOT / "requirements/dev.lock").read_text(), flags=re.MULTILINE)
    )
    for name in PROJECTS:
        for requirement in project(name)["dependencies"]:
            dist, _, version = requirement.partition("==")
            if dist.startswith("dreambooth-"):
                continue
            assert lock.get(dist.lower()) == version, requirement


def test_entry_points() -> None:
    assert entrypoint(IMAGES["operator"]) == ["dreambooth-operator"]
    assert entrypoint(IMAGES["trainer"]) == ["dreambooth-train"]
    # The same image serves: the build checks that the serving command exists too.
    assert "dreambooth-serve" in commands_named(IMAGES["trainer"])
    assert settings.OperatorSettings().trainer_command[0] in console_scripts()


def test_exposed_ports_match_the_operator_constants() -> None:
    assert exposed(IMAGES["operator"]) == {settings.OPERATOR_METRICS_PORT, settings.OPERATOR_HEALTH_PORT}
    assert exposed(IMAGES["trainer"]) == {settings.TRAINER_METRICS_PORT}
    env = " ".join(a for w, a in instructions(IMAGES["trainer"]) if w == "ENV")
    assert f"DREAMBOOTH_METRICS_PORT={settings.TRAINER_METRICS_PORT}" in env
    documented = re.search(r"`DREAMBOOTH_METRICS_PORT`[^\n]*default (\d+)", (ROOT / "docs/contracts.md").read_text())
    assert documented is not None
    assert int(documented.group(1)) == settings.TRAINER_METRICS_PORT


@pytest.mark.parametrize("image", sorted(IMAGES))
def test_multi_stage_pinned_non_root(image: str) -> None:
    steps = instructions(IMAGES[image])
    bases = [a.split()[0] for w, a in steps if w == "FROM"]
    assert len(bases) >= 2, "multi-stage build expected"
    for base in bases:
        assert re.search(r":[0-9][\w.-]*$", base), f"{base} is not pinned to a version tag"
    users = [a for w, a in steps if w == "USER"]
    assert users
    assert re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), "run as a numeric non-root uid"
    labels = " ".join(a for w, a in steps if w == "LABEL")
    assert f'org.opencontainers.image.version="{settings.VERSION}"' in labels
    if image == "trainer":  # the shared model cache volume is made writable for this group (fsGroup)
        assert users[-1].split(":")[-1] == str(TRAINER_GID)


def test_python_versions_agree_with_the_lock() -> None:
    lock_header = (ROOT / "requirements/dev.lock").read_text().splitlines()[1]
    version = re.search(r"--python-version (\d+\.\d+)", lock_header)
    assert version is not None
    minor = version.group(1)
    assert f"FROM python:{minor}." in IMAGES["operator"].read_text()
    assert f"uv python install {minor}." in IMAGES["trainer"].read_text()
    for name in PROJECTS:
        assert project(name)["version"] == settings.VERSION
    uv = re.search(r"UV_VERSION=([\d.]+)", (ROOT / "tests/infra/install-venv.sh").read_text())
    assert uv is not None
    assert f"ghcr.io/astral-sh/uv:{uv.group(1)} " in IMAGES["trainer"].read_text()


def test_dockerignore_keeps_what_the_dockerfiles_copy() -> None:
    rules = [
        r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines() if r.strip() and not r.startswith("#")
    ]

    def included(path: str) -> bool:
        keep = True
        for rule in rules:
            negate = rule.startswith("!")
            pattern = rule.removeprefix("!")
            if fnmatch(path, pattern) or fnmatch(path, pattern.rstrip("*").rstrip("/") + "/*") or path == pattern:
                keep = negate
        return keep

    for dockerfile in IMAGES.values():
        for word, args in instructions(dockerfile):
            if word == "COPY" and not args.startswith("--from"):
                source = args.split()[0]
                probe = source if source.endswith((".toml", ".lock")) else f"{source}/src/x.py"
                if source in ("operator", "trainer"):
                    assert included(f"{source}/pyproject.toml")
                assert included(probe), f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
    assert not included("trainer/src/dreambooth_trainer/__pycache__/x.pyc")
    assert not included(".venv/bin/python")


def test_default_images_agree_with_the_settings() -> None:
    defaults = settings.OperatorSettings()
    assert defaults.trainer_image == f"{api.IMAGE_REPOSITORY}/trainer:{settings.VERSION}"


def render_chart() -> list[dict]:
    helm = shutil.which("helm") or str(ROOT / ".tools/bin/helm")
    assert Path(helm).exists(), "helm is missing: make binaries"
    result = subprocess.run(
        [helm, "template", "dbo", str(CHART), "--namespace", "dreambooth-system"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return [d for d in yaml.safe_load_all(result.stdout) if isinstance(d, dict)]


def test_chart_uses_the_images_ports_and_names() -> None:
    docs = render_chart()
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    deployments = [d for d in docs if d.get("kind") == "Deployment"]
    assert len(deployments) == 1
    (container,) = [
        c for c in deployments[0]["spec"]["template"]["spec"]["containers"] if "operator" in c.get("image", "")
    ]
    assert container["image"] == f"{api.IMAGE_REPOSITORY}/operator:{chart['appVersion']}"
    assert chart["appVersion"] == settings.VERSION
    ports = {p["containerPort"] for p in container.get("ports", [])}
    assert ports <= exposed(IMAGES["operator"])
    assert settings.OPERATOR_METRICS_PORT in ports
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    trainer_image = env.get("DREAMBOOTH_OPERATOR_TRAINER_IMAGE", settings.OperatorSettings().trainer_image)
    assert trainer_image == f"{api.IMAGE_REPOSITORY}/trainer:{chart['appVersion']}"
    probe = container.get("livenessProbe", {}).get("httpGet", {})
    if probe:
        assert probe["port"] in (settings.OPERATOR_HEALTH_PORT, "health", "healthz")
