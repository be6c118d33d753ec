"""The generated CRDs on a real API server: examples accepted, invalid manifests rejected with their exact
message, immutability, round-trips of generated valid specs, `kubectl explain`, and the printer columns."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes import client
from kubernetes.client.rest import ApiException

from dreambooth_api import constants as c
from dreambooth_api.config import parse_job_config
from dreambooth_api.generate import inference_crd, job_crd
from dreambooth_api.inference import InferenceServiceSpec
from dreambooth_api.job import DreamBoothJobSpec
from tests.infra.controlplane import Cluster
from tests.infra.paths import ROOT
from tests.infra.processes import wait_until

EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
INVALID = sorted((Path(__file__).parent / "invalid").glob("*.yaml"))


@pytest.fixture(scope="module")
def crds(cluster: Cluster) -> Cluster:
    """The committed CRDs installed and served (idempotent: other modules may install them too)."""
    cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(ROOT / "crds"))
    names = [f"{c.JOB_PLURAL}.{c.GROUP}", f"{c.INFERENCE_PLURAL}.{c.GROUP}"]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *(f"crd/{n}" for n in names))

    def served() -> bool:
        return all(cluster.kubectl("get", kind, "-A", check=False).returncode == 0 for kind in ("dbj", "dbis"))

    wait_until(served, timeout=60, what="the dreambooth.dev resources to be discoverable")
    return cluster


def _header(text: str, key: str) -> str:
    found = re.search(rf"^# {key}: (.*)$", text, re.MULTILINE)
    assert found, f"missing '# {key}:' header"
    return found.group(1)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_passes_server_side_dry_run(crds: Cluster, namespace: str, path: Path) -> None:
    result = crds.kubectl("apply", "--dry-run=server", "--validate=strict", "-n", namespace, "-f", str(path))
    assert "created (server dry run)" in result.stdout


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.stem)
def test_invalid_manifest_is_rejected_with_its_message(crds: Cluster, namespace: str, path: Path) -> None:
    text = path.read_text()
    mode, expect = _header(text, "mode"), _header(text, "expect")
    if mode == "update":
        first, second = text.split("\n---\n")
        crds.kubectl("apply", "-n", namespace, "-f", "-", input=first)
        result = crds.kubectl("apply", "-n", namespace, "-f", "-", input=second, check=False)
    else:
        strict = ["--validate=strict"] if mode == "strict" else []
        result = crds.kubectl("apply", "--dry-run=server", *strict, "-n", namespace, "-f", "-", input=text, check=False)
    assert result.returncode != 0
    assert expect in result.stderr


def _minimal_job(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "examples" / "minimal-job.yaml").read_text())
    doc["metadata"]["name"] = name
    return dict(doc)


def test_run_policy_and_pod_template_stay_mutable(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_minimal_job("mutable")))
    patch = {
        "spec": {
            "runPolicy": {"suspend": True, "activeDeadlineSeconds": 600, "backoffLimit": 1},
            "podTemplate": {"image": "registry.example/trainer:v2"},
            "storage": {"region": "eu-west-1"},
        }
    }
    crds.kubectl("patch", "dbj", "mutable", "-n", namespace, "--type=merge", "-p", json.dumps(patch))
    spec = json.loads(crds.kubectl("get", "dbj", "mutable", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["runPolicy"] == {"suspend": True, "activeDeadlineSeconds": 600, "backoffLimit": 1, "preflight": True}
    assert spec["podTemplate"]["image"] == "registry.example/trainer:v2"


def test_defaults_are_filled_in_by_the_api_server(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_minimal_job("defaults")))
    spec = json.loads(crds.kubectl("get", "dbj", "defaults", "-n", namespace, "-o", "json").stdout)["spec"]
    assert spec["training"]["method"] == "lora"
    assert spec["training"]["checkpoint"] == {"intervalSteps": 100, "intervalSeconds": 600, "keep": 2}
    assert spec["resources"] == {"nodes": 1, "gpusPerNode": 1}  # gpuResourceName: the operator's setting
    assert spec["runPolicy"] == {"backoffLimit": 3, "suspend": False, "preflight": True}
    assert spec["output"]["formats"] == ["diffusers"]


def test_explain_prints_the_trainer_descriptions(crds: Cluster) -> None:
    def explained() -> str:
        return crds.kubectl("explain", "dreamboothjob.spec.training", check=False).stdout

    wait_until(lambda: "maxSteps" in explained(), timeout=60, what="the CRD's OpenAPI to be published")
    text = " ".join(explained().split())  # kubectl wraps descriptions
    assert "Training hyper-parameters" in text
    assert "Total optimizer steps." in text
    assert "enum: constant, constant_with_warmup, linear, cosine" in text
    field = " ".join(crds.kubectl("explain", "dbj.spec.resources.nodes").stdout.split())
    assert "more than one runs distributed data parallel training" in field


def _columns(cluster: Cluster, namespace: str, kind: str, name: str, *extra: str) -> dict[str, str]:
    lines = cluster.kubectl("get", kind, name, "-n", namespace, *extra).stdout.splitlines()
    header, row = lines[0], lines[1]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    bounds = [*starts[1:], None]
    return {header[s:e].strip(): row[s:e].strip() for s, e in zip(starts, bounds, strict=True)}


def test_printer_columns_show_status(crds: Cluster, namespace: str) -> None:
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(_minimal_job("columns")))
    status = {
        "status": {
            "phase": "Running",
            "progressText": "412/800",
            "progress": {"step": 412, "totalSteps": 800, "loss": 0.1234},
            "restarts": {"preemptions": 2, "failures": 1, "total": 3},
            "outputs": {"modelUri": "s3://dreambooth-examples/models/minimal/model"},
            "usage": {"podSeconds": 150, "gpuSeconds": 600, "gpuMinutes": 10, "gpusPerPod": 4},
            "conditions": [
                {
                    "type": "Running",
                    "status": "True",
                    "reason": "Training",
                    "lastTransitionTime": "2026-11-27T00:00:00Z",
                }
            ],
        }
    }
    crds.kubectl(
        "patch", "dbj", "columns", "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    cols = _columns(crds, namespace, "dbj", "columns")
    assert cols["PHASE"] == "Running"
    assert cols["PROGRESS"] == "412/800"
    assert cols["LOSS"] == "0.1234"
    assert cols["RESTARTS"] == "3"
    assert "MODEL" not in cols
    wide = _columns(crds, namespace, "dbj", "columns", "-o", "wide")
    assert wide["MODEL"] == "s3://dreambooth-examples/models/minimal/model"
    assert wide["GPU-MINUTES"] == "10"

    bad = {"status": {"phase": "Exploded"}}
    result = crds.kubectl(
        "patch",
        "dbj",
        "columns",
        "-n",
        namespace,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps(bad),
        check=False,
    )
    assert result.returncode != 0
    assert 'status.phase: Unsupported value: "Exploded"' in result.stderr


def test_inference_printer_columns(crds: Cluster, namespace: str) -> None:
    doc = yaml.safe_load((ROOT / "examples" / "inference-from-job.yaml").read_text())
    crds.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(doc))
    name = doc["metadata"]["name"]
    status = {
        "status": {
            "phase": "Ready",
            "replicas": 1,
            "readyReplicas": 1,
            "url": f"http://{name}.{namespace}.svc:8080",
            "modelUri": "s3://dreambooth-examples/models/full-v2/model",
            "servedModelUri": "s3://dreambooth-examples/models/full/model",
        }
    }
    crds.kubectl(
        "patch", "dbis", name, "-n", namespace, "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    cols = _columns(crds, namespace, "dbis", name)
    assert cols["PHASE"] == "Ready"
    assert cols["READY"] == "1"
    assert cols["URL"] == f"http://{name}.{namespace}.svc:8080"
    # The column names what the ready replicas serve (mid-rollout: not yet the wanted modelUri).
    assert cols["MODEL"] == "s3://dreambooth-examples/models/full/model"


# ---- property: valid specs generated from the schemas round-trip unchanged ------------------------------------

_TEXT = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=12)
_QUANTITIES = st.one_of(st.integers(1, 512), st.sampled_from(["500m", "1.5", "16Gi", "64Mi", "2"]))


def _from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that the structural schema accepts; every defaulted field is present, so nothing gets defaulted."""
    if node.get("x-kubernetes-int-or-string"):
        return _QUANTITIES
    if node.get("x-kubernetes-preserve-unknown-fields"):
        return st.just({})
    if "enum" in node:
        return st.sampled_from(node["enum"])
    base = _typed(node)
    return st.one_of(st.none(), base) if node.get("nullable") else base


def _typed(node: dict[str, Any]) -> st.SearchStrategy[Any]:  # noqa: PLR0911 - one branch per type
    kind = node["type"]
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        step = node.get("multipleOf", 1)
        lo, hi = node.get("minimum", 0), min(node.get("maximum", 10**6), 10**6)
        return st.integers(-(-lo // step), hi // step).map(lambda v: v * step)
    if kind == "number":
        return st.floats(
            node.get("minimum", 0.0),
            min(node.get("maximum", 1e6), 1e6),
            exclude_min=bool(node.get("exclusiveMinimum")),
            exclude_max=bool(node.get("exclusiveMaximum")),
            allow_nan=False,
            allow_infinity=False,
        )
    if kind == "string":
        lo, hi = node.get("minLength", 1), min(node.get("maxLength", 24), 24)
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True).filter(
                lambda s: lo <= len(s) <= node.get("maxLength", 10**6)
            )
        return (
            _TEXT.filter(lambda s: lo <= len(s) <= hi)
            if node.get("format") != "date-time"
            else st.just("2026-11-27T00:00:00Z")
        )
    if kind == "array":
        keys = node.get("x-kubernetes-list-map-keys", [])
        return st.lists(
            _from_schema(node["items"]),
            min_size=node.get("minItems", 0),
            max_size=min(node.get("maxItems", 3), 3),
            unique_by=(lambda item: tuple(item[k] for k in keys)) if keys else None,
        )
    if "additionalProperties" in node:
        return st.dictionaries(
            st.from_regex(r"[a-z][a-z0-9.-]{0,10}", fullmatch=True),
            _from_schema(node["additionalProperties"]),
            max_size=2,
        )
    props = node.get("properties", {})
    always = set(node.get("required", [])) | {k for k, v in props.items() if "default" in v}
    return st.fixed_dictionaries(
        {k: _from_schema(v) for k, v in props.items() if k in always},
        optional={k: _from_schema(v) for k, v in props.items() if k not in always},
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: not representable in JSON sent to the API server
        return False
    return True


def _valid(check: Any) -> Any:
    def ok(value: Any) -> bool:
        try:
            check(value)
        except ValueError:  # pydantic's ValidationError and the trainer's ConfigError are ValueErrors
            return False
        return True

    return ok


def _spec_schema(crd: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def _job_specs() -> st.SearchStrategy[dict[str, Any]]:
    props = _spec_schema(job_crd())["properties"]
    base = {"instanceImages": {"uri": "s3://bucket/i", "prompt": "p"}, "output": {"uri": "s3://bucket/o"}}

    def section(name: str) -> st.SearchStrategy[Any]:
        # Each trainer section is checked by the trainer's own model; a filter per section keeps rejections low.
        return _from_schema(props[name]).filter(_valid(lambda v: parse_job_config({**base, name: v})))

    def fix_cross_section(spec: dict[str, Any]) -> dict[str, Any]:
        # The spec-level rules tie sections together; repair instead of filtering.
        if spec["training"]["method"] != "lora":
            spec["output"]["formats"] = [f for f in spec["output"]["formats"] if f != "lora"] or ["diffusers"]
        if spec["resources"]["nodes"] > 1:
            spec["output"].setdefault("checkpointUri", "s3://bucket/checkpoints")
        return spec

    strategy = st.fixed_dictionaries(
        {name: section(name) for name in ("baseModel", "instanceImages", "priorPreservation", "training", "output")}
        | {name: _from_schema(props[name]) for name in ("storage", "runPolicy")}
        | {"resources": _from_schema(props["resources"]).map(lambda r: {**r, "nodes": min(r["nodes"], 4)})},
        optional={"podTemplate": _from_schema(props["podTemplate"])},
    ).map(fix_cross_section)

    def check(spec: dict[str, Any]) -> None:
        model = DreamBoothJobSpec.model_validate(spec)
        if model.cross_section_errors():
            raise ValueError(model.cross_section_errors())
        parse_job_config(model.trainer_config("n", "d"))

    return strategy.filter(_valid(check))


_COUNTER = itertools.count()


@settings(
    max_examples=25,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(spec=_job_specs())
def test_generated_job_specs_round_trip_unchanged(crds: Cluster, namespace: str, spec: dict[str, Any]) -> None:
    name = f"prop-{next(_COUNTER)}"
    body = {"apiVersion": c.API_VERSION, "kind": c.JOB_KIND, "metadata": {"name": name}, "spec": spec}
    with crds.api_client() as api:
        objects = client.CustomObjectsApi(api)
        try:
            objects.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.JOB_PLURAL, body)
        except ApiException as err:  # pragma: no cover - the failure message is the point
            pytest.fail(f"the API server rejected a spec our models accept: {err.body}\n{json.dumps(spec, indent=1)}")
        stored = objects.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.JOB_PLURAL, name)
        objects.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.JOB_PLURAL, name)
    assert stored["spec"] == spec


def _inference_specs() -> st.SearchStrategy[dict[str, Any]]:
    props = _spec_schema(inference_crd())["properties"]
    sources = st.one_of(
        st.fixed_dictionaries({"fromJob": _from_schema(props["model"]["properties"]["fromJob"])}),
        st.fixed_dictionaries(
            {"modelUri": _from_schema(props["model"]["properties"]["modelUri"])},
            optional={"baseModel": st.just({"tiny": True, "revision": "main"})},
        ),
    )
    specs = st.fixed_dictionaries(
        {"model": sources} | {k: _from_schema(v) for k, v in props.items() if k not in ("model",) and "default" in v},
        optional={k: _from_schema(v) for k, v in props.items() if k in ("auth", "podTemplate")},
    )
    return specs.filter(_valid(InferenceServiceSpec.model_validate))


@settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much, HealthCheck.too_slow],
)
@given(spec=_inference_specs())
def test_generated_inference_specs_round_trip_unchanged(crds: Cluster, namespace: str, spec: dict[str, Any]) -> None:
    name = f"prop-{next(_COUNTER)}"
    body = {"apiVersion": c.API_VERSION, "kind": c.INFERENCE_KIND, "metadata": {"name": name}, "spec": spec}
    with crds.api_client() as api:
        objects = client.CustomObjectsApi(api)
        try:
            objects.create_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.INFERENCE_PLURAL, body)
        except ApiException as err:  # pragma: no cover
            pytest.fail(f"the API server rejected a spec our models accept: {err.body}\n{json.dumps(spec, indent=1)}")
        stored = objects.get_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.INFERENCE_PLURAL, name)
        objects.delete_namespaced_custom_object(c.GROUP, c.VERSION, namespace, c.INFERENCE_PLURAL, name)
    assert stored["spec"] == spec
