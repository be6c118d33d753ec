"""Events a person reads (issue 20): one event per transition, and its text says what happened and what to do.

Conditions that change together with one reason (Failed and Running on a failure, Succeeded and Running on success)
used to give two events each ("InvalidInput" twice, "TrainingCompleted" twice with different texts), and PodsRunning
and Training had the same text.
"""

from __future__ import annotations

from datetime import timedelta

from dreambooth_api.common import Condition
from dreambooth_api.constants import ConditionStatus
from dreambooth_api.job import DreamBoothJobStatus
from dreambooth_operator.plan import EVENT_HINTS, event_text, transition_events
from tests.infra.wrappers import T0, iso, make_batch_job, make_job, make_pod
from tests.unit.operator.operator_plans import after, run


def _status(*conditions: tuple[str, bool, str, str]) -> DreamBoothJobStatus:
    return DreamBoothJobStatus(
        conditions=[
            Condition(
                type=type_,
                status=ConditionStatus.TRUE if ok else ConditionStatus.FALSE,
                reason=reason,
                message=message,
                last_transition_time=T0,
            )
            for type_, ok, reason, message in conditions
        ]
    )


def test_an_invalid_input_is_one_warning_that_says_what_to_do() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    pod = make_pod(job).exited(10, {"status": "failed", "reason": "InvalidInput", "message": "cat3.jpg is bad"})
    plan = run(job, [make_batch_job(job).obj()], [pod.obj()])
    assert [(e.type, e.reason) for e in plan.events] == [("Warning", "InvalidInput")]
    assert plan.events[0].message == (
        "cat3.jpg is bad; fix the input and create the job again (a failed job is not retried)"
    )


def test_success_is_one_event_with_the_model_and_the_next_steps() -> None:
    job = make_job().status(attempt=0, phase="Running", startTime=iso(T0)).obj()
    result = {"status": "succeeded", "modelUri": "s3://bucket/out/cat/model", "steps": 10, "finalLoss": 0.1}
    plan = run(job, [make_batch_job(job).complete().obj()], [make_pod(job).exited(0, result).obj()])
    assert [(e.type, e.reason) for e in plan.events] == [("Normal", "TrainingCompleted")]
    text = plan.events[0].message
    assert text.startswith("the model is at s3://bucket/out/cat/model; "), text
    assert "dreambooth report cat" in text
    assert "model.fromJob: cat" in text


def test_a_final_checkpoint_comes_before_the_end() -> None:
    prev = _status(("Running", True, "Training", "1 pod(s) running (attempt 0)"))
    new = _status(
        ("Running", False, "TrainingCompleted", "training completed"),
        ("Checkpointed", True, "CheckpointWritten", "step 20 at s3://b/c/step-20"),
        ("Succeeded", True, "TrainingCompleted", "the model is at s3://b/m"),
    )
    events = transition_events(prev, new, "cat")
    assert [(e.type, e.reason) for e in events] == [("Normal", "CheckpointWritten"), ("Normal", "TrainingCompleted")]
    assert events[1].message.startswith("the model is at s3://b/m; ")


def test_pods_running_and_training_say_different_things() -> None:
    job = make_job().status(attempt=0, phase="Pending", startTime=iso(T0)).obj()
    batch = make_batch_job(job).obj()
    started = run(job, [batch], [make_pod(job).running().obj()])
    assert [(e.type, e.reason) for e in started.events] == [("Normal", "PodsRunning")]
    training = _status(("Running", True, "Training", "1 pod(s) running (attempt 0)"))
    (event,) = transition_events(started.status, training, "cat")
    assert event.reason == "Training"
    assert event.message != started.events[0].message
    assert "dreambooth watch cat" in event.message
    # Written and reconciled again: nothing new happened, so no event.
    again = run(after(job, started), [batch], [make_pod(job).running().obj()], now=T0 + timedelta(seconds=40))
    assert again.events == []


def test_a_new_job_with_a_valid_spec_is_no_news() -> None:
    new = _status(("Valid", True, "SpecValid", "the spec is valid"), ("Running", False, "PodsPending", "0/1"))
    assert transition_events(DreamBoothJobStatus(), new, "cat") == []


def test_an_invalid_spec_is_one_event_although_three_conditions_change() -> None:
    new = _status(
        ("Valid", False, "InvalidSpec", "spec.training.maxSteps: too large"),
        ("Failed", True, "InvalidSpec", "spec.training.maxSteps: too large"),
        ("Running", False, "InvalidSpec", "spec.training.maxSteps: too large"),
    )
    events = transition_events(DreamBoothJobStatus(), new, "cat")
    assert [(e.type, e.reason) for e in events] == [("Warning", "InvalidSpec")]
    assert "create the job again" in events[0].message


def test_every_hint_names_the_job_where_it_gives_a_command() -> None:
    for reason, hint in EVENT_HINTS.items():
        text = event_text(reason, "what happened", "cat")
        assert text.startswith("what happened; "), (reason, text)
        assert "{" not in text, (reason, text)
        assert ("dreambooth " in hint) == ("dreambooth " in text and " cat" in text), (reason, text)
    assert event_text("SomethingElse", "what happened.", "cat") == "what happened."
