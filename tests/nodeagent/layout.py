"""Where a pod's files live under the agent's state folder (shared by the agent, its log server and the fixture).

    <root>/pods/<namespace>/<pod>/<uid>/pod.json                   which containers, when created
    <root>/pods/<namespace>/<pod>/<uid>/work/                      working dir shared by the pod's containers
    <root>/pods/<namespace>/<pod>/<uid>/tmp/                       TMPDIR
    <root>/pods/<namespace>/<pod>/<uid>/logs/<container>/<n>.log   CRI log of run n (restart count n)
    <root>/pods/<namespace>/<pod>/<uid>/termination/<container>-<n>   the termination message file of run n

A pod name can come back with a new uid (a StatefulSet, a recreated bare pod); the newest ``pod.json`` wins.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def pod_dir(root: Path, namespace: str, name: str, uid: str) -> Path:
    return root / "pods" / namespace / name / uid


def write_pod_info(directory: Path, info: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "pod.json").write_text(json.dumps(info))


def read_pod_info(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((directory / "pod.json").read_text())
    return result


def latest_pod_dir(root: Path, namespace: str, name: str) -> Path | None:
    base = root / "pods" / namespace / name
    candidates = [d for d in base.glob("*") if (d / "pod.json").exists()] if base.exists() else []
    if not candidates:
        return None
    return max(candidates, key=lambda d: read_pod_info(d).get("created", 0.0))


def log_path(directory: Path, container: str, run: int) -> Path:
    return directory / "logs" / container / f"{run}.log"


def container_runs(directory: Path, container: str) -> list[int]:
    folder = directory / "logs" / container
    return sorted(int(p.stem) for p in folder.glob("*.log")) if folder.exists() else []


def find_log(directory: Path, container: str, *, previous: bool = False) -> Path | None:
    """The current run's log (or the one before with ``previous``); None when there is none."""
    runs = container_runs(directory, container)
    index = -2 if previous else -1
    if len(runs) < abs(index):
        return None
    return log_path(directory, container, runs[index])


def default_container(directory: Path) -> str:
    info = read_pod_info(directory)
    annotation = info.get("defaultContainer")
    return str(annotation or info["containers"][0])
