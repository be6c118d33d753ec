"""End to end: the exact events (reason and type, in order) of a DreamBoothJob that succeeds and of one that fails
on bad input (issue 20): only the operator's own events, one per transition, none of kopf's INFO log lines, and
no event for what every new job starts with (a valid spec, pods not running yet).

The operator counts every event it emits (dreambooth_operator_events_total); the list is read once the job is
terminal and every emitted event has been posted (the job's Event objects number as many as the counter), so that a
late duplicate would be in it. A job's reconcile loop ends at its terminal status, so nothing comes after.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tests.e2e.test_operator_training import TRAIN_TIMEOUT, phase, staged_example
from tests.infra.controlplane import Cluster
from tests.infra.operator import OperatorProcess, apply, get, items, wait_for
from tests.infra.s3 import S3Server

EVENTS_METRIC = re.compile(r"^dreambooth_operator_events_total\{[^}]*\} ([0-9.e+]+)$", re.MULTILINE)


def emitted(op: OperatorProcess) -> int:
    """How many events the operator has emitted (its only jobs are this test's)."""
    return round(sum(float(v) for v in EVENTS_METRIC.findall(op.metrics_text())))


def job_events(cluster: Cluster, namespace: str, name: str) -> list[dict[str, Any]]:
    """The job's Event objects in the order they were written (resourceVersion: one etcd, one counter)."""
    found = [
        e
        for e in items(cluster, "events", namespace)
        if (e.get("involvedObject") or {}).get("kind") == "DreamBoothJob"
        and (e.get("involvedObject") or {}).get("name") == name
    ]
    return sorted(found, key=lambda e: int(e["metadata"]["resourceVersion"]))


def settled_events(cluster: Cluster, namespace: str, op: OperatorProcess, name: str) -> list[dict[str, Any]]:
    """The job's events once every event the operator emitted is posted."""
    events: list[dict[str, Any]] = wait_for(
        "every emitted event posted",
        lambda: job_events(cluster, namespace, name),
        lambda found: len(found) >= emitted(op),
        60,
        op,
    )
    return events


def reasons_and_types(events: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(str(e.get("reason")), str(e.get("type"))) for e in events]


def finish(cluster: Cluster, namespace: str, op: OperatorProcess, name: str) -> dict[str, Any]:
    dbj: dict[str, Any] = wait_for(
        "a terminal phase",
        lambda: get(cluster, "dreamboothjob", name, namespace),
        lambda j: phase(j) in ("Succeeded", "Failed"),
        TRAIN_TIMEOUT,
        op,
    )
    return dbj


def test_a_job_that_succeeds_has_one_event_per_transition(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    # 40 steps with a checkpoint every 5: long enough for a /progress read while training, and a checkpoint
    # before the end (the first one is an event; later ones only update the status).
    _, job = staged_example(cluster, s3, namespace, steps=40)
    apply(cluster, job, namespace)
    dbj = finish(cluster, namespace, op, "minimal")
    assert phase(dbj) == "Succeeded", json.dumps(dbj["status"], indent=1)
    events = settled_events(cluster, namespace, op, "minimal")
    assert reasons_and_types(events) == [
        ("CheckingInput", "Normal"),
        ("InputValid", "Normal"),
        ("PodsRunning", "Normal"),
        ("Training", "Normal"),
        ("CheckpointWritten", "Normal"),
        ("TrainingCompleted", "Normal"),
    ], json.dumps([(e["reason"], e["type"], e["message"]) for e in events], indent=1)
    texts = [e["message"] for e in events]
    assert len(set(texts)) == len(texts), texts
    assert "dreambooth report minimal" in texts[-1], texts[-1]


def test_a_job_with_bad_input_has_one_failure_event_that_says_what_to_do(
    cluster: Cluster, namespace: str, s3: S3Server, op: OperatorProcess
) -> None:
    bucket, job = staged_example(cluster, s3, namespace)
    s3.client().put_object(Bucket=bucket, Key="subjects/dog/cat3.jpg", Body=b"not an image at all")
    apply(cluster, job, namespace)
    dbj = finish(cluster, namespace, op, "minimal")
    assert phase(dbj) == "Failed", json.dumps(dbj["status"], indent=1)
    events = settled_events(cluster, namespace, op, "minimal")
    # The CPU-only input check finds the bad image: no GPU pod ever runs.
    assert reasons_and_types(events) == [
        ("CheckingInput", "Normal"),
        ("InvalidInput", "Warning"),
    ], json.dumps([(e["reason"], e["type"], e["message"]) for e in events], indent=1)
    failure = events[-1]["message"]
    assert "cat3.jpg" in failure, failure
    assert "create the job again" in failure, failure
