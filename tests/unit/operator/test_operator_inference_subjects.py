"""InferenceService spec.subjects: the jobs a label selector chooses are published in a ConfigMap, with no rollout."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from pydantic import ValidationError

from dreambooth_api.inference import InferenceServiceSpec, LabelSelector
from dreambooth_operator.handlers import inference as inference_handlers
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.inference import lora_uri, reconcile_inference, servable_subjects
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0

SETTINGS = OperatorSettings(trainer_image="trainer:test", network_policies=False)
MODEL = "s3://bkt/base/model"
SELECTOR = {"matchLabels": {"team": "avatars"}}


def isvc(subjects: dict[str, Any] | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"model": {"modelUri": MODEL}, "scaling": {"replicas": 1}}
    if subjects is not None:
        spec["subjects"] = subjects
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "avatars", "namespace": "ns", "uid": "uid-avatars", "generation": 1},
        "spec": spec,
    }


def job(
    name: str,
    labels: dict[str, str] | None = None,
    *,
    phase: str = "Succeeded",
    formats: tuple[str, ...] = ("lora",),
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    uri = f"s3://bkt/out/{name}"
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {"team": "avatars"} if labels is None else labels},
        "spec": {"output": {"uri": uri, "formats": list(formats)}},
        "status": {"phase": phase, "outputs": {"modelUri": f"{uri}/model"}, "conditions": conditions or []},
    }


def test_lora_uri_of_a_job() -> None:
    assert lora_uri(job("dog")) == "s3://bkt/out/dog/lora"
    assert lora_uri(job("dog", formats=("diffusers", "lora"))) == "s3://bkt/out/dog/lora"
    assert lora_uri(job("dog", formats=("diffusers",))) is None
    lora_only = {"spec": {}, "status": {"outputs": {"modelUri": "s3://bkt/x/lora/"}}}
    assert lora_uri(lora_only) == "s3://bkt/x/lora"


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({}, ["cat", "dog", "owl"]),
        ({"matchLabels": {"team": "avatars"}}, ["cat", "dog"]),
        ({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["gold", "silver"]}]}, ["dog", "owl"]),
        ({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["gold"]}]}, ["cat", "owl"]),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, ["dog", "owl"]),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, ["cat"]),
        (
            {"matchLabels": {"team": "avatars"}, "matchExpressions": [{"key": "tier", "operator": "Exists"}]},
            ["dog"],
        ),
    ],
)
def test_selector_matching(selector: dict[str, Any], expected: list[str]) -> None:
    jobs = [
        job("cat"),
        job("dog", {"team": "avatars", "tier": "gold"}),
        job("owl", {"team": "birds", "tier": "silver"}),
    ]
    assert list(servable_subjects(LabelSelector.model_validate(selector), jobs)) == expected


def test_selector_query_syntax() -> None:
    selector = LabelSelector.model_validate(
        {
            "matchLabels": {"b": "2", "a": "1"},
            "matchExpressions": [
                {"key": "t", "operator": "In", "values": ["x", "y"]},
                {"key": "u", "operator": "NotIn", "values": ["z"]},
                {"key": "v", "operator": "Exists"},
                {"key": "w", "operator": "DoesNotExist"},
            ],
        }
    )
    assert selector.to_query() == "a=1,b=2,t in (x,y),u notin (z),v,!w"


@pytest.mark.parametrize(
    "requirement",
    [
        {"key": "t", "operator": "In"},
        {"key": "t", "operator": "Exists", "values": ["x"]},
        {"key": "t", "operator": "Is"},
    ],
)
def test_invalid_requirements_are_rejected(requirement: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        LabelSelector.model_validate({"matchExpressions": [requirement]})


def test_only_succeeded_lora_jobs_that_passed_their_gate_are_served() -> None:
    gated = [{"type": "QualityGateFailed", "status": "True", "reason": "LowScore"}]
    passed = [{"type": "QualityGateFailed", "status": "False", "reason": "Passed"}]
    jobs = [
        job("ok"),
        job("passed", conditions=passed),
        job("running", phase="Running"),
        job("failed", phase="Failed"),
        job("gated", conditions=gated),
        job("full", formats=("diffusers",)),
        job("not.a.label"),
        job("other", {"team": "birds"}),
    ]
    subjects = servable_subjects(LabelSelector.model_validate(SELECTOR), jobs)
    assert subjects == {"ok": "s3://bkt/out/ok/lora", "passed": "s3://bkt/out/passed/lora"}


def plan_of(service: dict[str, Any], jobs: list[dict[str, Any]]) -> Any:
    return reconcile_inference(service, None, None, SETTINGS, T0, subject_jobs=jobs)


def child(plan: Any, kind: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in plan.children if c["kind"] == kind)
    return found


def test_the_subjects_configmap_is_owned_sorted_json_and_counted() -> None:
    plan = plan_of(isvc(SELECTOR), [job("zebra"), job("ant"), job("other", {"team": "birds"})])
    configmap = child(plan, "ConfigMap")
    assert configmap["metadata"]["name"] == "avatars-subjects"
    assert [r["uid"] for r in configmap["metadata"]["ownerReferences"] if r["controller"]] == ["uid-avatars"]
    text = configmap["data"]["subjects.json"]
    assert json.loads(text) == {"ant": "s3://bkt/out/ant/lora", "zebra": "s3://bkt/out/zebra/lora"}
    assert text.index("ant") < text.index("zebra")
    assert plan.status.subjects == 2
    assert plan.status.to_wire()["subjects"] == 2


def test_the_server_reads_the_mounted_subjects_file() -> None:
    pod = child(plan_of(isvc(SELECTOR), []), "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    config = json.loads(next(e["value"] for e in container["env"] if e["name"] == "DREAMBOOTH_SERVE_CONFIG"))
    assert config["subjectsFile"] == "/etc/dreambooth/subjects/subjects.json"
    volume = next(v for v in pod["volumes"] if v["name"] == "subjects")
    assert volume["configMap"]["name"] == "avatars-subjects"
    mount = next(m for m in container["volumeMounts"] if m["name"] == "subjects")
    assert mount == {"name": "subjects", "mountPath": "/etc/dreambooth/subjects", "readOnly": True}


def test_a_new_subject_changes_the_configmap_and_never_the_pod_template() -> None:
    before = plan_of(isvc(SELECTOR), [job("dog")])
    after = plan_of(isvc(SELECTOR), [job("dog"), job("cat")])
    assert child(before, "Deployment") == child(after, "Deployment")
    assert child(before, "ConfigMap") != child(after, "ConfigMap")
    assert (before.status.subjects, after.status.subjects) == (1, 2)


def test_without_subjects_nothing_is_mounted_or_counted() -> None:
    service = isvc()
    service["status"] = {"subjects": 3}
    plan = plan_of(service, [job("dog")])
    assert [c["kind"] for c in plan.children] == ["Deployment", "Service"]
    pod = child(plan, "Deployment")["spec"]["template"]["spec"]
    assert "volumes" not in pod
    assert plan.status.subjects is None
    assert "subjects" not in plan.status.to_wire()


def test_a_foreign_configmap_of_the_subjects_name_blocks_the_apply() -> None:
    foreign = {"metadata": {"name": "avatars-subjects", "namespace": "ns", "uid": "other"}}
    children = {("ConfigMap", "avatars-subjects"): foreign}
    plan = reconcile_inference(isvc(SELECTOR), None, None, SETTINGS, T0, children=children, subject_jobs=[job("a")])
    assert plan.children == []
    assert plan.status.phase == "Pending"
    assert "ConfigMap avatars-subjects" in (plan.status.message or "")


def test_spec_subjects_validates() -> None:
    spec = InferenceServiceSpec.model_validate(isvc(SELECTOR)["spec"])
    assert spec.subjects is not None
    assert spec.subjects.match_labels == {"team": "avatars"}


def operator_state() -> OperatorState:
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    return OperatorState(settings=SETTINGS, api=None, metrics=OperatorMetrics(), poller=poller)


def test_any_job_end_in_the_namespace_wakes_the_services_with_subjects() -> None:
    state = operator_state()
    with_subjects = state.wakes.setdefault(("ns", "inferenceservice/avatars"), asyncio.Event())
    elsewhere = state.wakes.setdefault(("other", "inferenceservice/birds"), asyncio.Event())
    entry = inference_handlers.services_with_subjects(namespace="ns", name="avatars", spec=isvc(SELECTOR)["spec"])
    assert entry == {"ns": "avatars"}
    assert inference_handlers.services_with_subjects(namespace="ns", name="x", spec=isvc()["spec"]) is None
    index = {"ns": ["avatars"], "other": ["birds"]}
    for event, phase, woken in [
        ("MODIFIED", "Running", False),
        ("MODIFIED", "Succeeded", True),
        ("MODIFIED", "Failed", True),
        ("DELETED", None, True),
    ]:
        with_subjects.clear()
        status = {"phase": phase} if phase else {}
        inference_handlers.wake_subject_services(
            namespace="ns", memo={"state": state}, type=event, status=status, services_with_subjects=index
        )
        assert with_subjects.is_set() is woken, (event, phase)
        assert not elsewhere.is_set()


def test_the_handler_reads_the_selector_or_none() -> None:
    assert inference_handlers.subjects_selector(isvc()) is None
    selector = inference_handlers.subjects_selector(isvc(SELECTOR))
    assert selector is not None
    assert selector.to_query() == "team=avatars"
    bad = isvc({"matchExpressions": [{"key": "t", "operator": "In"}]})
    assert inference_handlers.subjects_selector(bad) is None
