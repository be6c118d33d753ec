"""Restrictions: the operator's settings limit the images, ServiceAccounts and priority classes that the pods of a
DreamBoothJob or an InferenceService may use; a violation fails the resource at once, naming the rule."""

from __future__ import annotations

from typing import Any

import pytest

from dreambooth_api.common import PodTemplateOverrides
from dreambooth_operator.inference import reconcile_inference
from dreambooth_operator.observed import Observed
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.reconcile import reconcile
from dreambooth_operator.restrictions import PodRestrictions, image_allowed, violations
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, make_batch_job, make_job
from tests.unit.operator.operator_plans import NOW, cond, reasons

SETTINGS = OperatorSettings(
    trainer_image="ghcr.io/dreambooth-operator/trainer:0.1.0",
    restrictions=PodRestrictions(image_prefixes=("registry.corp/ml/",), priority_classes=("batch-low",)),
    namespace_restrictions={
        "team-a": PodRestrictions(image_prefixes=("registry.corp/team-a/",), service_accounts=("trainer",)),
    },
)


@pytest.mark.parametrize(
    ("image", "prefixes", "allowed"),
    [
        ("registry.corp/ml/trainer:1", ("registry.corp/ml/",), True),
        ("registry.corp/ml", ("registry.corp/ml",), True),
        ("registry.corp/ml:2", ("registry.corp/ml",), True),
        ("registry.corp/ml@sha256:abc", ("registry.corp/ml",), True),
        ("registry.corp/mlx/evil:1", ("registry.corp/ml",), False),  # a prefix stops at a boundary
        ("registry.corp.evil.example/ml/trainer:1", ("registry.corp",), False),
        ("docker.io/library/python:3", ("registry.corp/ml/",), False),
        ("anything", (), False),
    ],
)
def test_image_prefixes_match_at_a_boundary(image: str, prefixes: tuple[str, ...], allowed: bool) -> None:
    assert image_allowed(image, prefixes) is allowed


@pytest.mark.parametrize(
    ("namespace", "template", "expected"),
    [
        ("team-b", {}, []),
        ("team-b", {"image": "ghcr.io/dreambooth-operator/trainer:0.1.0"}, []),  # the operator's own image
        ("team-b", {"image": "registry.corp/ml/trainer:2", "priorityClassName": "batch-low"}, []),
        ("team-b", {"serviceAccountName": "anything"}, []),  # no ServiceAccount rule outside team-a
        (
            "team-b",
            {"image": "evil.example/miner:1"},
            [
                "spec.podTemplate.image 'evil.example/miner:1' is not allowed: images must start with one of "
                "'registry.corp/ml/' (the operator setting restrictions.imagePrefixes)"
            ],
        ),
        (
            "team-a",
            {"image": "registry.corp/ml/trainer:2", "serviceAccountName": "admin", "priorityClassName": "urgent"},
            [
                "spec.podTemplate.image 'registry.corp/ml/trainer:2' is not allowed: images must start with one of "
                "'registry.corp/team-a/' (the operator setting namespaceRestrictions['team-a'].imagePrefixes)",
                "spec.podTemplate.serviceAccountName 'admin' is not allowed: allowed are 'trainer' "
                "(the operator setting namespaceRestrictions['team-a'].serviceAccounts)",
                "spec.podTemplate.priorityClassName 'urgent' is not allowed: allowed are 'batch-low' "
                "(the operator setting restrictions.priorityClasses)",
            ],
        ),
    ],
)
def test_rules_name_the_setting_they_come_from(namespace: str, template: dict[str, Any], expected: list[str]) -> None:
    pod_template = PodTemplateOverrides.model_validate(template) if template else None
    assert violations(pod_template, SETTINGS.rules_for(namespace)) == expected


def test_settings_read_camel_case_json_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_RESTRICTIONS", '{"imagePrefixes": ["r/"], "serviceAccounts": []}')
    monkeypatch.setenv("DREAMBOOTH_OPERATOR_NAMESPACE_RESTRICTIONS", '{"a": {"priorityClasses": ["low"]}}')
    settings = OperatorSettings()
    assert settings.restrictions == PodRestrictions(image_prefixes=("r/",), service_accounts=())
    rules = settings.rules_for("a").restrictions
    assert (rules.image_prefixes, rules.service_accounts, rules.priority_classes) == (("r/",), (), ("low",))
    # An empty list allows only the default: here, no ServiceAccount but the namespace's default.
    assert violations(PodTemplateOverrides(service_account_name="x"), settings.rules_for("b")) != []
    assert violations(PodTemplateOverrides(), settings.rules_for("b")) == []


def test_a_job_that_breaks_a_rule_fails_at_once_and_its_running_attempt_is_stopped() -> None:
    job = make_job().pod_template(image="evil.example/miner:1").status(attempt=0, phase="Running").obj()
    rules = SETTINGS.rules_for("team-a")
    plan = reconcile(Observed(job=job, batch_jobs=[make_batch_job(job).obj()], pods=[], now=NOW, rules=rules))
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "PolicyViolation")
    assert cond(plan, "Valid") == ("False", "PolicyViolation")
    assert "namespaceRestrictions['team-a'].imagePrefixes" in (plan.status.message or "")
    assert ("Warning", "PolicyViolation") in reasons(plan)
    assert plan.actions == [Action(ActionKind.DELETE_BATCH_JOB, name="cat-a0")]


def test_a_job_within_the_rules_is_created() -> None:
    job = make_job().pod_template(image="registry.corp/team-a/trainer:3", serviceAccountName="trainer")
    plan = reconcile(Observed(job=job.obj(), batch_jobs=[], pods=[], now=NOW, rules=SETTINGS.rules_for("team-a")))
    assert plan.actions == [Action(ActionKind.CREATE_PREFLIGHT, name="cat-check")]  # the input check comes first
    job = job.no_preflight().obj()
    plan = reconcile(Observed(job=job, batch_jobs=[], pods=[], now=NOW, rules=SETTINGS.rules_for("team-a")))
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]


def test_an_inference_service_that_breaks_a_rule_fails_without_children() -> None:
    isvc = {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "team-a", "uid": "uid-dog", "generation": 1},
        "spec": {"model": {"modelUri": "s3://bkt/m"}, "podTemplate": {"priorityClassName": "urgent"}},
    }
    plan = reconcile_inference(isvc, None, None, SETTINGS, T0)
    assert plan.children == []
    assert plan.status.phase == "Failed"
    assert "priorityClassName 'urgent' is not allowed" in (plan.status.message or "")
    assert [(t, r) for t, r, _ in plan.events] == [("Warning", "PolicyViolation")]
