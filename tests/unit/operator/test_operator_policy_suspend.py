"""Suspend policy: user suspend, resume, and Kueue admission."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dreambooth_operator.builders import parse_spec
from dreambooth_operator.plan import Action, ActionKind
from dreambooth_operator.policies import suspend
from dreambooth_operator.policies.suspend import desired_batch_suspend, waiting_for_admission
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import NOW, after, builder, cond, reasons, run


@pytest.mark.parametrize(
    ("user", "batch", "kueue", "write", "queued"),
    [
        (False, False, False, None, False),
        (True, False, False, True, False),
        (True, True, False, None, False),
        (False, True, False, False, False),  # resume
        (False, True, True, None, True),  # Kueue has not admitted it yet: never unsuspend it ourselves
        (False, False, True, None, False),  # admitted
        (True, False, True, True, False),  # the user's suspend wins over the queue
    ],
)
def test_suspend(user: bool, batch: bool, kueue: bool, write: bool | None, queued: bool) -> None:
    assert desired_batch_suspend(user, batch, kueue) is write
    assert waiting_for_admission(user, batch, kueue) is queued


def test_suspend_and_resume() -> None:
    job = make_job().suspend().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    plan = run(job, [make_batch_job(job).obj()], [make_pod(job).running().obj()])
    assert plan.actions == [Action(ActionKind.SET_SUSPEND, name="cat-a0", suspend=True)]
    assert plan.status.phase == "Suspended"
    assert cond(plan, "Suspended") == ("True", "SuspendedByUser")
    resumed_job = after(job, plan)
    resumed_job["spec"]["runPolicy"]["suspend"] = False
    later = NOW + timedelta(seconds=100)
    plan = run(resumed_job, [make_batch_job(job).suspended().obj()], [], now=later)
    assert plan.actions == [Action(ActionKind.SET_SUSPEND, name="cat-a0", suspend=False)]
    assert cond(plan, "Suspended") == ("False", "Resumed")
    assert ("Normal", "Resumed") in reasons(plan)
    assert plan.status.start_time == later  # suspended time does not count against the deadline


def test_kueue_job_is_queued_until_admitted() -> None:
    job = make_job().queue("gpu").no_preflight().obj()
    plan = run(job)
    assert plan.actions == [Action(ActionKind.CREATE_ATTEMPT, attempt=0)]
    assert plan.status.phase == "Queued"
    job = after(job, plan)
    plan = run(job, [make_batch_job(job).suspended().obj()], [])
    assert plan.actions == []
    assert plan.status.phase == "Queued"
    assert cond(plan, "Queued") == ("True", "WaitingForAdmission")
    plan = run(after(job, plan), [make_batch_job(job).obj()], [make_pod(job).obj()])
    assert plan.status.phase == "Pending"
    assert cond(plan, "Queued") == ("False", "Admitted")


def test_a_new_attempt_is_created_held_by_the_user_or_the_queue() -> None:
    b = builder(make_job().suspend().obj())
    assert suspend.hold_new_attempt(b, parse_spec(b.obs.job))
    assert b.status.phase == "Suspended"
    b = builder(make_job().queue("gpu").obj())
    assert suspend.hold_new_attempt(b, parse_spec(b.obs.job))
    assert b.status.phase == "Queued"
    b = builder(make_job().obj())
    assert not suspend.hold_new_attempt(b, parse_spec(b.obs.job))
    assert b.status.phase is None
