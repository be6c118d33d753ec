"""Validity policy: a spec the operator cannot run fails the job at once, with every reason."""

from __future__ import annotations

from dreambooth_operator.policies import validity
from tests.infra.wrappers import make_job
from tests.unit.operator.operator_plans import NOW, builder, cond, reasons, run


def test_invalid_spec_fails_without_children() -> None:
    plan = run(make_job("x" * 60).obj())
    assert plan.actions == []
    assert plan.status.phase == "Failed"
    assert cond(plan, "Failed") == ("True", "InvalidSpec")
    assert ("Warning", "InvalidSpec") in reasons(plan)
    assert plan.finished


def test_a_valid_spec_is_parsed_and_marked_valid() -> None:
    b = builder(make_job().obj())
    spec = validity.valid_spec(b)
    assert spec is not None
    assert spec.resources.nodes == 1
    assert [(c.type, c.status.value, c.reason) for c in b.status.conditions] == [("Valid", "True", "SpecValid")]
    assert b.status.phase is None


def test_every_reason_is_reported_together() -> None:
    job = make_job("x" * 60).pod_template(env=[{"name": "WORLD_SIZE", "value": "9"}]).obj()
    b = builder(job)
    assert validity.valid_spec(b) is None
    assert b.status.phase == "Failed"
    message = b.status.message or ""
    assert "metadata.name is 60 characters" in message
    assert "spec.podTemplate.env may not set WORLD_SIZE" in message
    assert b.status.completion_time == NOW
