"""Differential fuzz of the two validators of a manifest: the real API server (the generated CRD's schema and CEL
rules, server-side dry-run create with strict field validation, as `kubectl apply` does) and the Python models
(`dreambooth_api`: what the operator and `dreambooth run --local` accept, CEL twins included). Hypothesis mutates the
examples (wrong types, out-of-range numbers and lengths, missing fields, unknown enum values, fields added that break
a CEL rule) and both sides must agree on accept or reject. Fixed examples (`derandomize`): a failure reproduces.
100 examples per kind, 4-12 s each on the shared 2-core machine.

`null` is not one of the wrong types: the API server prunes a null field of a structural schema (then defaults it),
while a typed model has no such step; nobody writes one by accident and neither side runs a job differently.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.rest import ApiException

from dreambooth_api import constants as c
from dreambooth_api.config import BaseModelSpec, parse_job_config
from dreambooth_api.generate import inference_crd, job_crd
from dreambooth_api.inference import InferenceServiceSpec
from dreambooth_api.job import DreamBoothJobSpec
from tests.infra.controlplane import Cluster
from tests.infra.operator import install_crds
from tests.infra.paths import ROOT

EXAMPLES = [d for p in sorted((ROOT / "examples").glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]
FieldPath = tuple[str | int, ...]
WRONG_TYPES: list[Any] = ["x", 7, 2.5, True, [], {}]
# Read compatibility on purpose: the models still read `captions: true/false`, the type the CRD had before the enum,
# so that objects stored then keep working; the API server refuses it in new writes.
OLD_TYPES: dict[FieldPath, type] = {("instanceImages", "captions"): bool}
# Values that each break one CEL rule (or its Python twin) of the spec or of a section, set by path.
JOB_RULE_BREAKERS: list[tuple[FieldPath, Any]] = [
    (("resources", "nodes"), 2),  # multi-node needs output.checkpointUri
    (("output", "formats"), ["lora"]),  # with training.method full
    (("training", "method"), "full"),  # with lora output
    (("training", "lora"), {"rank": 4}),  # only with method lora
    (("runPolicy", "gpuSecondsLimit"), 100),  # with gpusPerNode 0
    (("resources", "gpusPerNode"), 0),
    (("evaluation",), {"judge": True}),  # the judge needs vlm
    (("evaluation",), {"minScore": 0.5}),  # minScore needs judge
    (("instanceImages", "captions"), "auto"),  # auto captions need vlm
    (("instanceImages", "files"), ["a.png"]),  # with uri: exactly one of them
    (("baseModel", "tiny"), True),  # exactly one of id, uri, tiny
    (("baseModel", "id"), "org/model"),
    (("baseModel", "uri"), "s3://bucket/model"),
    (("priorPreservation",), {"enabled": True}),  # classPrompt required
]
ISVC_RULE_BREAKERS: list[tuple[FieldPath, Any]] = [
    (("model", "fromJob"), "job"),  # exactly one of fromJob, modelUri
    (("model", "modelUri"), "s3://bucket/model"),
    (("model", "baseModel"), {"tiny": True}),  # only with modelUri
    (("scaling",), {"replicas": 2, "minReplicas": 1, "maxReplicas": 2}),
    (("scaling",), {"minReplicas": 1}),
    (("scaling",), {"minReplicas": 3, "maxReplicas": 2}),
    (("scaling",), {"targetInflightRequests": 2}),
]


def _seeds(kind: str) -> list[dict[str, Any]]:
    return [d["spec"] for d in EXAMPLES if d.get("kind") == kind]


def _schema(crd: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def _paths(value: Any, node: dict[str, Any], path: FieldPath = ()) -> list[tuple[FieldPath, dict[str, Any]]]:
    """Every value inside `value` (the root excluded) with its schema node."""
    found: list[tuple[FieldPath, dict[str, Any]]] = []
    if isinstance(value, dict):
        props = node.get("properties", {})
        for key, child in value.items():
            child_node = props.get(key) or node.get("additionalProperties") or {}
            found += [((*path, key), child_node), *_paths(child, child_node, (*path, key))]
    elif isinstance(value, list) and "items" in node:
        for i, child in enumerate(value):
            found += [((*path, i), node["items"]), *_paths(child, node["items"], (*path, i))]
    return found


def _out_of_range(node: dict[str, Any]) -> list[Any]:
    """Values of the node's own type that break its bounds, length, pattern or enum."""
    kind = node.get("type")
    bad: list[Any] = []
    if "enum" in node:
        bad.append("NotAnEnumValue")
    if kind in ("integer", "number"):
        bad += [node["minimum"] - 1] if "minimum" in node else []
        bad += [node["maximum"] + 1] if "maximum" in node else []
        bad += [node["minimum"]] if node.get("exclusiveMinimum") else []
        bad += [node["maximum"]] if node.get("exclusiveMaximum") else []
        bad += [2.5] if kind == "integer" else []
    elif kind == "string":
        bad += ["a" * (node["maxLength"] + 1)] if "maxLength" in node else []
        bad += [""] if node.get("minLength", 0) > 0 else []
        bad += ["Not Valid!"] if "pattern" in node else []
    elif kind == "array":
        bad += [[]] if node.get("minItems", 0) > 0 else []
    return bad


def _set(spec: dict[str, Any], path: FieldPath, value: Any) -> None:
    """Set the value at `path`, making each object on the way one (a rule breaker after a retype)."""
    parent: Any = spec
    for key, below in itertools.pairwise(path):
        current = parent.get(key) if isinstance(parent, dict) else parent[key]
        if isinstance(below, str) and not isinstance(current, dict):
            parent[key] = {}
        parent = parent[key]
    parent[path[-1]] = value


def _delete(spec: dict[str, Any], path: FieldPath) -> None:
    parent: Any = spec
    for key in path[:-1]:
        parent = parent[key]
    del parent[path[-1]]


@st.composite
def _manifests(
    draw: st.DrawFn, seeds: list[dict[str, Any]], schema: dict[str, Any], breakers: list[tuple[FieldPath, Any]]
) -> tuple[dict[str, Any], list[str]]:
    """A seed with 0-2 mutations; returns the spec and what was done to it."""
    spec = copy.deepcopy(draw(st.sampled_from(seeds)))
    done: list[str] = []
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(["retype", "range", "delete", "rule"]))
        if how == "rule":
            path, value = draw(st.sampled_from(breakers))
            _set(spec, path, copy.deepcopy(value))
            done.append(f"set {'.'.join(map(str, path))}={json.dumps(value)}")
            continue
        paths = _paths(spec, schema)
        if how == "range":
            paths = [(p, n) for p, n in paths if _out_of_range(n)]
        if not paths:
            continue
        path, node = draw(st.sampled_from(paths))
        dotted = ".".join(map(str, path))
        if how == "delete":
            _delete(spec, path)
            done.append(f"delete {dotted}")
            continue
        if how == "range":
            value = draw(st.sampled_from(_out_of_range(node)))
        else:
            old = OLD_TYPES.get(tuple(p for p in path if isinstance(p, str)), type(None))
            wrong = [v for v in WRONG_TYPES if not _same_type(v, node) and type(v) is not old]
            if not wrong:  # an untyped node (x-kubernetes-preserve-unknown-fields) takes any value
                continue
            value = draw(st.sampled_from(wrong))
        _set(spec, path, value)
        done.append(f"{how} {dotted}={json.dumps(value)[:40]}")
    return spec, done


def _same_type(value: Any, node: dict[str, Any]) -> bool:
    """Whether the schema node accepts the JSON type of `value` (a number node accepts an integer)."""
    if node.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    kind = node.get("type")
    if kind is None:
        return True
    return {
        "boolean": isinstance(value, bool),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "string": isinstance(value, str),
        "array": isinstance(value, list),
        "object": isinstance(value, dict),
    }[kind]


def _python_job(spec: dict[str, Any]) -> list[str]:
    """What the operator's validation and the trainer's config parser say (empty: accepted)."""
    try:
        model = DreamBoothJobSpec.model_validate(spec)
        parse_job_config(model.trainer_config("n", "ns"))
    except ValueError as err:  # pydantic's ValidationError and the trainer's ConfigError are ValueErrors
        return [str(err)]
    return model.cross_section_errors()


def _python_isvc(spec: dict[str, Any]) -> list[str]:
    try:
        model = InferenceServiceSpec.model_validate(spec)
        if model.model.base_model is not None:
            BaseModelSpec.model_validate(model.model.base_model)
    except ValueError as err:
        return [str(err)]
    return []


def _server(objects: client.CustomObjectsApi, namespace: str, kind: str, plural: str, spec: dict[str, Any]) -> str:
    """The API server's verdict on a dry-run create: "" when accepted, else its message."""
    body = {"apiVersion": c.API_VERSION, "kind": kind, "metadata": {"name": "fuzz"}, "spec": spec}
    try:
        objects.create_namespaced_custom_object(
            c.GROUP, c.VERSION, namespace, plural, body, dry_run="All", field_validation="Strict"
        )
    except ApiException as err:
        status, answer = err.status, err.body
    else:
        return ""
    assert status in (400, 422), answer  # a rejection, not a server fault
    return str(json.loads(answer)["message"])


def _regression(example: str, path: FieldPath, value: Any = None) -> tuple[dict[str, Any], list[str]]:
    """An example's spec with one field set (or deleted, when `value` is None): a disagreement found before."""
    doc = next(d for p in [ROOT / "examples" / example] for d in yaml.safe_load_all(p.read_text()) if d)
    spec = copy.deepcopy(doc["spec"])
    if value is None:
        _delete(spec, path)
    else:
        _set(spec, path, value)
    return spec, [f"regression: {example} {'.'.join(map(str, path))}={json.dumps(value)}"]


# Disagreements the fuzz found, each kept as an example that always runs.
REGRESSIONS = {
    c.JOB_KIND: [
        _regression("minimal-job.yaml", ("training", "maxSteps"), True),  # lax models took true as 1
        _regression("minimal-job.yaml", ("training", "learningRate"), "0.001"),  # and a numeric string
        _regression("minimal-job.yaml", ("priorPreservation", "enabled"), 1),  # and 1 as true
        # A metric model with no source: the models refused it, the CRD had no CEL rule for it.
        _regression("evaluation-job.yaml", ("evaluation", "dinoModel", "tiny")),
    ],
    c.INFERENCE_KIND: [
        _regression("inference-from-job.yaml", ("resources", "memory"), True),  # a quantity took true as 1
    ],
}
CASES = {
    c.JOB_KIND: (c.JOB_PLURAL, job_crd, JOB_RULE_BREAKERS, _python_job),
    c.INFERENCE_KIND: (c.INFERENCE_PLURAL, inference_crd, ISVC_RULE_BREAKERS, _python_isvc),
}
EXAMPLES_PER_KIND = 100


def _examples(cases: list[tuple[dict[str, Any], list[str]]]) -> Callable[[Any], Any]:
    def decorate(test: Any) -> Any:
        for case in cases:
            test = example(case=case)(test)
        return test

    return decorate


@pytest.mark.parametrize("kind", list(CASES))
def test_api_server_and_models_agree_on_mutated_manifests(cluster: Cluster, namespace: str, kind: str) -> None:
    plural, crd, breakers, python = CASES[kind]
    check: Callable[[dict[str, Any]], list[str]] = python
    install_crds(cluster)
    verdicts: Counter[bool] = Counter()
    with cluster.api_client() as api:
        objects = client.CustomObjectsApi(api)

        @settings(
            max_examples=EXAMPLES_PER_KIND,
            derandomize=True,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(case=_manifests(_seeds(kind), _schema(crd()), breakers))
        @_examples(REGRESSIONS[kind])
        def agree(case: tuple[dict[str, Any], list[str]]) -> None:
            spec, done = case
            server, ours = _server(objects, namespace, kind, plural, spec), check(spec)
            verdicts[not server] += 1
            assert bool(server) == bool(ours), (
                f"{kind} after {done}: API server {'rejects: ' + server if server else 'accepts'}; "
                f"models {'reject: ' + '; '.join(ours) if ours else 'accept'}\n{json.dumps(spec, indent=1)}"
            )

        agree()
    assert verdicts[True] > 0
    assert verdicts[False] > 0  # the mutations reach both verdicts
