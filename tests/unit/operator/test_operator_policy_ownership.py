"""Ownership policy: an attempt is created only where nothing else holds a shared child's name (ConfigMap, Service,
NetworkPolicy); a foreign object is a ChildConflict condition and a Warning event naming it, never an action."""

from __future__ import annotations

from typing import Any

import pytest

from dreambooth_operator.inference import InferencePlan, reconcile_inference
from dreambooth_operator.observed import Observed
from dreambooth_operator.ownership import ObservedChildren
from dreambooth_operator.plan import Action, ActionKind, Plan
from dreambooth_operator.reconcile import reconcile
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import make_job
from tests.unit.operator.operator_plans import NOW, cond, reasons

CREATE = [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]


def obj(kind: str, name: str, controller: dict[str, Any] | None = None, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "team-a", "uid": f"uid-{kind}-{name}"}
    if controller is not None:
        meta["ownerReferences"] = [{"controller": True, **controller}]
    if deleting:
        meta["deletionTimestamp"] = "2026-11-27T00:00:00Z"
    return {"kind": kind, "metadata": meta}


MINE = {"kind": "DreamBoothJob", "name": "cat", "uid": "uid-cat"}
EARLIER = {"kind": "DreamBoothJob", "name": "cat", "uid": "uid-old"}
OTHER = {"kind": "Deployment", "name": "web", "uid": "uid-web"}


def children(**by_kind: dict[str, Any] | None) -> ObservedChildren:
    names = {"ConfigMap": "cat-config", "Service": "cat-workers", "NetworkPolicy": "cat-network"}
    return {(kind, name): by_kind.get(kind) for kind, name in names.items()}


def plan_for(job: dict[str, Any], observed: ObservedChildren | None) -> Plan:
    return reconcile(Observed(job=job, batch_jobs=[], pods=[], now=NOW, children=observed))


def test_without_the_children_read_the_first_plan_creates_and_the_handler_reads_them() -> None:
    assert plan_for(make_job().no_preflight().obj(), None).actions == CREATE


@pytest.mark.parametrize(
    "observed",
    [
        children(),
        children(ConfigMap=obj("ConfigMap", "cat-config", MINE), Service=obj("Service", "cat-workers", MINE)),
    ],
    ids=["absent", "owned"],
)
def test_absent_or_owned_children_let_the_attempt_start(observed: ObservedChildren) -> None:
    plan = plan_for(make_job().no_preflight().obj(), observed)
    assert plan.actions == CREATE
    assert cond(plan, "ChildConflict") is None


@pytest.mark.parametrize(
    ("kind", "name", "controller", "says"),
    [
        ("ConfigMap", "cat-config", None, "no controller"),
        ("Service", "cat-workers", OTHER, "controller: Deployment web"),
        (
            "NetworkPolicy",
            "cat-network",
            {"kind": "DreamBoothJob", "name": "dog", "uid": "uid-dog"},
            "controller: DreamBoothJob dog",
        ),
    ],
)
def test_a_foreign_child_blocks_the_attempt_with_a_condition_and_a_warning(
    kind: str, name: str, controller: dict[str, Any] | None, says: str
) -> None:
    plan = plan_for(make_job().no_preflight().obj(), children(**{kind: obj(kind, name, controller)}))
    assert plan.actions == []
    assert plan.status.phase == "Pending"
    assert cond(plan, "ChildConflict") == ("True", "ChildConflict")
    message = plan.status.message or ""
    assert f"the {kind} {name} already exists and is not controlled by this resource ({says})" in message
    assert "neither overwrites nor deletes it" in message
    warning = [e for e in plan.events if e.reason == "ChildConflict"]
    assert [(e.type, kind in e.message and name in e.message) for e in warning] == [("Warning", True)]
    assert plan.requeue_after == 10.0


def test_the_conflict_is_reported_once_and_resolved_when_the_object_is_gone() -> None:
    job = make_job().no_preflight().obj()
    blocked = plan_for(job, children(ConfigMap=obj("ConfigMap", "cat-config")))
    job = {**job, "status": blocked.status_wire()}
    again = plan_for(job, children(ConfigMap=obj("ConfigMap", "cat-config")))
    assert ("Warning", "ChildConflict") not in reasons(again)
    resolved = plan_for({**job, "status": again.status_wire()}, children())
    assert resolved.actions == CREATE
    assert cond(resolved, "ChildConflict") == ("False", "ConflictResolved")


@pytest.mark.parametrize("deleting", [False, True])
def test_leftovers_of_an_earlier_job_of_the_same_name_are_waited_for_without_a_conflict(deleting: bool) -> None:
    plan = plan_for(make_job().no_preflight().obj(), children(Service=obj("Service", "cat-workers", EARLIER, deleting)))
    assert plan.actions == []
    assert plan.status.phase == "Pending"
    assert "waiting for the Service cat-workers of an earlier object with this name to be deleted" in (
        plan.status.message or ""
    )
    assert cond(plan, "ChildConflict") is None
    assert plan.requeue_after == 2.0


def test_a_foreign_batch_job_that_is_not_an_earlier_jobs_is_a_conflict() -> None:
    job = make_job().no_preflight().obj()
    foreign = obj("Job", "cat-a0", OTHER)
    foreign["metadata"]["labels"] = {"dreambooth.dev/job-name": "cat", "dreambooth.dev/attempt": "0"}
    plan = reconcile(Observed(job=job, batch_jobs=[foreign], pods=[], now=NOW))
    assert plan.actions == []
    assert cond(plan, "ChildConflict") == ("True", "ChildConflict")
    assert "the Job cat-a0 already exists" in (plan.status.message or "")


# --- InferenceService: the same rule for its Deployment, Service, HPA and NetworkPolicy -------------------------

ISVC = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "InferenceService",
    "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 1},
    "spec": {"model": {"modelUri": "s3://bkt/m"}},
}
SERVICE_OF = {"kind": "InferenceService", "name": "dog", "uid": "uid-dog"}


def serve(spec: dict[str, Any], deployment: dict[str, Any] | None = None, **children: Any) -> InferencePlan:
    isvc = {**ISVC, "spec": {**ISVC["spec"], **spec}}
    observed = {(kind, "dog"): obj for kind, obj in children.items()}
    return reconcile_inference(isvc, None, deployment, OperatorSettings(), NOW, (), observed)


def test_a_foreign_service_of_the_name_stops_every_apply_of_the_inference_service() -> None:
    plan = serve({}, Service=obj("Service", "dog", OTHER))
    assert plan.children == []
    assert plan.handover is None
    assert plan.status.phase == "Pending"
    conditions = {c.type: (c.status.value, c.reason) for c in plan.status.conditions}
    assert conditions["ChildConflict"] == ("True", "ChildConflict")
    assert conditions["Ready"] == ("False", "ChildConflict")
    assert [(t, r) for t, r, m in plan.events if "the Service dog" in m] == [("Warning", "ChildConflict")]


def test_a_foreign_deployment_of_the_name_is_a_conflict_too() -> None:
    plan = serve({}, deployment=obj("Deployment", "dog"))
    assert plan.children == []
    assert "the Deployment dog already exists" in (plan.status.message or "")


def test_a_foreign_hpa_matters_only_while_autoscaling() -> None:
    hpa = obj("HorizontalPodAutoscaler", "dog", OTHER)
    fixed = serve({"scaling": {"replicas": 1}}, HorizontalPodAutoscaler=hpa)
    assert [c["kind"] for c in fixed.children] == ["Deployment", "Service", "NetworkPolicy"]
    assert fixed.stale == [("autoscaling/v2", "HorizontalPodAutoscaler", "dog")]  # deleted only if the service's own
    autoscaled = serve({"scaling": {"minReplicas": 1, "maxReplicas": 3}}, HorizontalPodAutoscaler=hpa)
    assert autoscaled.children == []


def test_owned_children_are_applied_and_a_past_conflict_resolved() -> None:
    blocked = serve({}, Service=obj("Service", "dog"))
    isvc = {**ISVC, "status": blocked.status.to_wire()}
    plan = reconcile_inference(
        isvc, None, None, OperatorSettings(), NOW, (), {("Service", "dog"): obj("Service", "dog", SERVICE_OF)}
    )
    assert [c["kind"] for c in plan.children] == ["Deployment", "Service", "NetworkPolicy"]
    conditions = {c.type: (c.status.value, c.reason) for c in plan.status.conditions}
    assert conditions["ChildConflict"] == ("False", "ConflictResolved")
