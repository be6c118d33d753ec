"""YAML read as Kubernetes reads it. PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-4`) and `1e-4` is a
string; kubectl (go-yaml) and YAML 1.2 read `1e-4` as a float. With the models' strict number types a manifest
that `kubectl apply` accepts must load the same here, so every reader of a job's YAML uses this loader."""

from __future__ import annotations

import re
from typing import Any

import yaml

# The YAML 1.2 core schema's float, plus YAML 1.1's sexagesimal-free forms PyYAML already knows (.inf, .nan).
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)


class KubeLoader(yaml.SafeLoader):
    """SafeLoader whose implicit floats are YAML 1.2's (`1e-4` is a float); integers stay integers."""


KubeLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:float"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
KubeLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))  # type: ignore[no-untyped-call]


def safe_load(text: str) -> Any:
    """One YAML document, floats as Kubernetes reads them."""
    return yaml.load(text, Loader=KubeLoader)  # noqa: S506 - a SafeLoader subclass


def safe_load_all(text: str) -> list[Any]:
    """Every YAML document, floats as Kubernetes reads them."""
    return list(yaml.load_all(text, Loader=KubeLoader))
