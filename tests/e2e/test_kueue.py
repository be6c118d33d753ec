"""End to end with the real Kueue (tests/infra/kueue.py): DreamBoothJobs with the `kueue.x-k8s.io/queue-name` label
are queued, admitted and preempted by Kueue's controller manager, built from its Go module, with the objects of
examples/kueue/ applied as they are (only the cluster-scoped ClusterQueue is renamed per test). The operator is the
chart's: `helm install` into the test's namespace, its Deployment's pod run by the node agent as the chart's
ServiceAccount (tests/infra/helm.py `installed_operator`), and `helm uninstall` after each test.

- three 1-GPU jobs on a 2-GPU ClusterQueue: two run, the third is Queued (no pod) until one finishes;
- an urgent job (WorkloadPriorityClass) preempts a running batch one, which checkpoints on its way out, is Queued
  again, is readmitted when the urgent one is done and resumes with no step redone;
- a 2-node job is admitted as one unit: no rank runs while only one GPU is free, both run once two are; then an
  urgent job preempts it as one unit (both ranks stopped together, one checkpoint), and once readmitted both ranks
  resume from it with no step redone.

Kueue is started once for this module and stopped after it: a running Kueue manages every queue-labelled batch
Job of the cluster, so it would fight test_operator_suspend.py, which admits such a Job by hand.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.e2e.test_operator_training import credentials_secret, example, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.helm import InstalledOperator, installed_operator
from tests.infra.kueue import Kueue, running_kueue
from tests.infra.operator import apply, condition, get, items
from tests.infra.operator import wait_for as wait_for_value
from tests.infra.paths import ROOT
from tests.infra.processes import NotReadyError, wait_until
from tests.infra.s3 import S3Server

EXAMPLES = ROOT / "examples" / "kueue"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"
TIMEOUT = 600.0
TRAINER = "dreambooth.dev/component=trainer"
ONE_THREAD = [{"name": "OMP_NUM_THREADS", "value": "1"}]
GANG_STEPS = 30


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, infra_work_dir: Path, infra_log_dir: Path) -> Iterator[Kueue]:
    with running_kueue(cluster, infra_work_dir / "kueue", infra_log_dir) as running:
        print(f"kueue {running.version} ready in {running.started_in_s}s")  # the start-up figure, in the -s output
        yield running


@pytest.fixture
def op(cluster: Cluster, namespace: str, node_agent: Any) -> Iterator[InstalledOperator]:
    """The chart's operator in this test's namespace; a 30 s grace period for trainer pods, as the harness gives."""
    with installed_operator(cluster, node_agent, namespace, "--set=trainer.terminationGraceSeconds=30") as operator:
        yield operator


def wait_for(
    what: str, fetch: Callable[[], Any], predicate: Callable[[Any], bool], timeout: float, op: InstalledOperator
) -> Any:
    """tests/infra/operator.py's wait_for, with the chart operator's log in the error."""
    try:
        return wait_for_value(what, fetch, predicate, timeout)
    except NotReadyError as err:
        raise AssertionError(f"{err}\n{op.log_tail()}") from err


def _docs(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((EXAMPLES / name).read_text()) if d]


def install_queues(cluster: Cluster, kueue: Kueue, namespace: str) -> str:
    """examples/kueue/priorities.yaml and queues.yaml, the ClusterQueue named for this test; return its name."""
    kueue.apply(*_docs("priorities.yaml"))
    docs = _docs("queues.yaml")
    cluster_queue = f"dreambooth-gpus-{namespace}"[:63]
    for doc in docs:
        if doc["kind"] == "ClusterQueue":
            doc["metadata"]["name"] = cluster_queue
        if doc["kind"] == "LocalQueue":
            doc["spec"]["clusterQueue"] = cluster_queue
    kueue.apply(*docs, namespace=namespace)

    def active(kind: str, name: str, ns: str | None = None) -> bool:
        obj = get(cluster, kind, name, ns) if ns else _cluster_scoped(cluster, kind, name)
        return (condition(obj or {}, "Active") or {}).get("status") == "True"

    wait_until(lambda: active("clusterqueues.kueue.x-k8s.io", cluster_queue), what="ClusterQueue Active")
    wait_until(lambda: active("localqueues.kueue.x-k8s.io", "gpu-queue", namespace), what="LocalQueue Active")
    return cluster_queue


def _cluster_scoped(cluster: Cluster, kind: str, name: str) -> dict[str, Any] | None:
    result = cluster.kubectl("get", kind, name, "-o", "json", check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def queued_job(
    s3: S3Server, bucket: str, name: str, *, steps: int, priority: str | None = None, checkpoint_every: int = 5
) -> dict[str, Any]:
    """examples/kueue/queued-job.yaml with its placeholders replaced, renamed, `steps` long, one torch thread."""
    job = example(s3, bucket, EXAMPLES / "queued-job.yaml")
    job["metadata"]["name"] = name
    if priority is not None:
        job["metadata"]["labels"][PRIORITY_LABEL] = priority
    spec = job["spec"]
    spec["output"]["uri"] = f"s3://{bucket}/models/{name}/"
    checkpoint = {"intervalSteps": checkpoint_every, "intervalSeconds": None}
    spec["training"].update({"maxSteps": steps, "checkpoint": checkpoint})
    spec["podTemplate"] = {"env": list(ONE_THREAD)}
    return job


def staged_bucket(cluster: Cluster, s3: S3Server, namespace: str) -> str:
    bucket = s3.make_bucket()
    upload_images(s3, bucket, "subjects/dog/")
    credentials_secret(cluster, s3, namespace)
    return bucket


def jobs(cluster: Cluster, namespace: str) -> dict[str, dict[str, Any]]:
    return {j["metadata"]["name"]: j for j in items(cluster, "dreamboothjobs", namespace)}


def live_pods(cluster: Cluster, namespace: str, name: str | None = None) -> list[dict[str, Any]]:
    """Training pods that hold their GPU: not finished, not being deleted. (The CPU-only pre-flight check pods are
    not Kueue's: they run before the queued batch Job and never count against its quota.)"""
    selector = TRAINER + (f",dreambooth.dev/job-name={name}" if name else "")
    return [
        p
        for p in items(cluster, "pods", namespace, selector)
        if p["status"].get("phase") in (None, "Pending", "Running") and not p["metadata"].get("deletionTimestamp")
    ]


def unfinished_pods(cluster: Cluster, namespace: str, batch_job: str) -> list[dict[str, Any]]:
    """The pods of a batch Job whose containers have not exited, Terminating ones too (a preempted trainer logs
    `preempted` only once its checkpoint is written, after its pod was marked for deletion)."""
    pods = items(cluster, "pods", namespace, f"job-name={batch_job}")
    return [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]


def workload_of(kueue: Kueue, namespace: str, batch_job: str) -> dict[str, Any]:
    """The Workload Kueue made for a batch Job (owned by it)."""
    workloads = kueue.workloads(namespace)
    for wl in workloads:
        owners = wl["metadata"].get("ownerReferences", [])
        if any(o.get("kind") == "Job" and o.get("name") == batch_job for o in owners):
            return wl
    raise AssertionError(f"no Workload for Job {batch_job}: {[w['metadata']['name'] for w in workloads]}")


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def trainer_events(node_agent: Any, namespace: str, pod: str, event: str) -> list[dict[str, Any]]:
    lines = node_agent.logs(namespace, pod).splitlines()
    return [e for e in (json.loads(x) for x in lines if x.startswith("{")) if e.get("event") == event]


def wait_all_finished(
    cluster: Cluster, namespace: str, names: list[str], op: InstalledOperator, node_agent: Any, timeout: float = TIMEOUT
) -> dict[str, dict[str, Any]]:
    try:
        return dict(
            wait_for_value(
                f"{names} finished",
                lambda: jobs(cluster, namespace),
                lambda js: all(phase(js.get(n)) in ("Succeeded", "Failed") for n in names),
                timeout,
            )
        )
    except NotReadyError as err:
        pods = items(cluster, "pods", namespace, "dreambooth.dev/job-name")
        logs = {p["metadata"]["name"]: node_agent.logs(namespace, p["metadata"]["name"])[-1500:] for p in pods}
        raise AssertionError(f"{err}\n{json.dumps(logs, indent=1)}\n{op.log_tail()}") from err


def test_kueue_admits_two_of_three_jobs_on_a_two_gpu_queue(
    cluster: Cluster, namespace: str, s3: S3Server, kueue: Kueue, op: InstalledOperator, node_agent: Any
) -> None:
    install_queues(cluster, kueue, namespace)
    bucket = staged_bucket(cluster, s3, namespace)
    names = ["queued-a", "queued-b", "queued-c"]
    for name in names:
        apply(cluster, queued_job(s3, bucket, name, steps=15), namespace)

    most_running = [0]

    def sample() -> dict[str, dict[str, Any]]:
        most_running[0] = max(most_running[0], len(live_pods(cluster, namespace)))
        return jobs(cluster, namespace)

    def two_running_one_queued(js: dict[str, dict[str, Any]]) -> bool:
        phases = sorted(str(phase(js.get(n))) for n in names)
        return phases == ["Queued", "Running", "Running"]

    js = wait_for("two Running and one Queued", sample, two_running_one_queued, TIMEOUT, op)
    (waiting,) = [n for n in names if phase(js[n]) == "Queued"]
    first = [n for n in names if n != waiting]
    # The third: no pod, its batch Job suspended, Queued in its status, and pending in Kueue for lack of quota.
    assert live_pods(cluster, namespace, waiting) == []
    assert (get(cluster, "job.batch", f"{waiting}-a0", namespace) or {})["spec"]["suspend"] is True
    queued = condition(js[waiting], "Queued") or {}
    assert (queued.get("status"), queued.get("reason")) == ("True", "WaitingForAdmission"), js[waiting]["status"]
    assert js[waiting]["status"].get("reason") == "WaitingForAdmission", js[waiting]["status"]
    pending = workload_of(kueue, namespace, f"{waiting}-a0")
    reserved = condition(pending, "QuotaReserved") or {}
    assert reserved.get("status") == "False", pending["status"]
    assert "insufficient" in reserved.get("message", "").lower(), reserved

    done = wait_all_finished(cluster, namespace, names, op, node_agent)
    assert {n: phase(done[n]) for n in names} == dict.fromkeys(names, "Succeeded"), {
        n: done[n]["status"] for n in names
    }
    assert most_running[0] == 2  # never a third pod while the quota was 2 GPUs
    # The third started only after one of the first two finished (Kueue admitted it when their GPU came back).
    batch = {n: get(cluster, "job.batch", f"{n}-a0", namespace) or {} for n in names}
    first_done = min(parse_time(batch[n]["status"]["completionTime"]) for n in first)
    assert parse_time(batch[waiting]["status"]["startTime"]) >= first_done, {n: batch[n]["status"] for n in names}
    admitted = condition(done[waiting], "Queued") or {}
    assert (admitted.get("status"), admitted.get("reason")) == ("False", "Admitted"), done[waiting]["status"]
    # Kueue assigned the "gpu" flavor and put its node labels on the pods it admitted (the operator kept them).
    wl = workload_of(kueue, namespace, f"{waiting}-a0")
    assert wl["status"]["admission"]["podSetAssignments"][0]["flavors"] == {"nvidia.com/gpu": "gpu"}
    pod = items(cluster, "pods", namespace, f"{TRAINER},dreambooth.dev/job-name={waiting}")[0]
    assert pod["spec"].get("nodeSelector", {}).get("nvidia.com/gpu.present") == "true", pod["spec"].get("nodeSelector")


def test_kueue_preempts_a_batch_job_for_an_urgent_one_which_resumes_without_redoing_steps(
    cluster: Cluster, namespace: str, s3: S3Server, kueue: Kueue, op: InstalledOperator, node_agent: Any
) -> None:
    install_queues(cluster, kueue, namespace)
    bucket = staged_bucket(cluster, s3, namespace)
    # No periodic checkpoint: the only one the victim can resume from is the one it writes when Kueue stops it.
    low = ["batch-a", "batch-b"]
    for name in low:
        apply(cluster, queued_job(s3, bucket, name, steps=40, checkpoint_every=1000), namespace)

    def training(js: dict[str, dict[str, Any]]) -> bool:
        return all(
            phase(js.get(n)) == "Running" and ((js[n]["status"].get("progress") or {}).get("step") or 0) >= 3
            for n in low
        )

    wait_for("both batch jobs training", lambda: jobs(cluster, namespace), training, TIMEOUT, op)
    apply(cluster, queued_job(s3, bucket, "urgent", steps=10, priority="dreambooth-urgent"), namespace)

    def evicted() -> list[str]:
        return [
            n for n in low if (get(cluster, "job.batch", f"{n}-a0", namespace) or {}).get("spec", {}).get("suspend")
        ]

    victims: list[str] = []

    def one_evicted() -> bool:
        victims[:] = evicted()
        return len(victims) == 1

    wait_until(one_evicted, what="Kueue to suspend one batch job", timeout=120)
    (victim,) = victims
    (survivor,) = [n for n in low if n != victim]
    stopped_pod = next(
        p["metadata"]["name"] for p in items(cluster, "pods", namespace, f"{TRAINER},dreambooth.dev/job-name={victim}")
    )
    # Kueue's side: the victim's Workload was evicted for the urgent one (reason Preempted).
    wl = workload_of(kueue, namespace, f"{victim}-a0")
    evicted_cond = condition(wl, "Evicted") or {}
    assert evicted_cond.get("reason") == "Preempted", wl["status"]
    # The operator's side: queued again, not failed, its pod gone after a checkpoint.
    requeued = wait_for(
        "the victim queued again, its pod stopped",
        lambda: get(cluster, "dreamboothjob", victim, namespace),
        lambda j: phase(j) == "Queued" and not unfinished_pods(cluster, namespace, f"{victim}-a0"),
        120,
        op,
    )
    assert requeued["status"]["reason"] == "Preempted", requeued["status"]
    assert (condition(requeued, "Queued") or {}).get("status") == "True", requeued["status"]
    assert (condition(requeued, "Running") or {}).get("reason") == "Preempted", requeued["status"]
    assert requeued["status"]["restarts"]["preemptions"] == 1, requeued["status"]
    stopped = trainer_events(node_agent, namespace, stopped_pod, "preempted")
    assert stopped, node_agent.logs(namespace, stopped_pod)[-2000:]
    stopped_step = stopped[0]["step"]
    assert 3 <= stopped_step < 40

    done = wait_all_finished(cluster, namespace, [*low, "urgent"], op, node_agent)
    assert {n: phase(j) for n, j in done.items()} == {victim: "Succeeded", survivor: "Succeeded", "urgent": "Succeeded"}
    status = done[victim]["status"]
    assert status["progressText"] == "40/40"
    assert status["progress"]["stepsRedone"] == 0, status["progress"]
    assert status["restarts"] == {"preemptions": 1, "failures": 0, "total": 1}, status["restarts"]
    assert done[survivor]["status"]["restarts"]["total"] == 0, done[survivor]["status"]
    # Readmitted only once a GPU was free again (the urgent job or the survivor finished), and its new pod resumed
    # from the step it stopped at.
    finished = [get(cluster, "job.batch", f"{n}-a0", namespace) or {} for n in ("urgent", survivor)]
    gpu_free = min(parse_time(j["status"]["completionTime"]) for j in finished)
    resumed_pod = next(
        p
        for p in items(cluster, "pods", namespace, f"{TRAINER},dreambooth.dev/job-name={victim}")
        if p["metadata"]["name"] != stopped_pod
    )
    assert parse_time(resumed_pod["metadata"]["creationTimestamp"]) >= gpu_free
    resumed = trainer_events(node_agent, namespace, resumed_pod["metadata"]["name"], "resumed")
    assert [e["step"] for e in resumed] == [stopped_step]


def test_kueue_admits_and_preempts_a_two_node_job_as_one_unit(
    cluster: Cluster, namespace: str, s3: S3Server, kueue: Kueue, op: InstalledOperator, node_agent: Any
) -> None:
    install_queues(cluster, kueue, namespace)
    bucket = staged_bucket(cluster, s3, namespace)
    # "single" trains long enough to hold its GPU for the whole check below; then it is deleted to free the GPU.
    apply(cluster, queued_job(s3, bucket, "single", steps=2000, checkpoint_every=1000), namespace)
    wait_for("single Running", lambda: get(cluster, "dreamboothjob", "single", namespace),
             lambda j: phase(j) == "Running", TIMEOUT, op)  # fmt: skip
    # No periodic checkpoint: the gang can only resume from the one it writes when Kueue stops it.
    gang = queued_job(s3, bucket, "gang", steps=GANG_STEPS, checkpoint_every=1000)
    gang["spec"]["resources"] = {"nodes": 2, "gpusPerNode": 1}
    gang["spec"]["output"]["checkpointUri"] = f"s3://{bucket}/checkpoints/gang/"
    apply(cluster, gang, namespace)

    # While "single" holds one of the two GPUs, the gang (two 1-GPU ranks) runs no rank at all.
    samples: list[tuple[str | None, int]] = []

    def sample() -> dict[str, dict[str, Any]]:
        js = jobs(cluster, namespace)
        samples.append((phase(js.get("single")), len(live_pods(cluster, namespace, "gang"))))
        return js

    wait_for("the gang Queued", sample, lambda js: phase(js.get("gang")) == "Queued", 120, op)
    pending = workload_of(kueue, namespace, "gang-a0")
    assert [ps["count"] for ps in pending["spec"]["podSets"]] == [2]
    assert (condition(pending, "QuotaReserved") or {}).get("status") == "False", pending["status"]
    wait_until(lambda: len(sample()) > 0 and len(samples) >= 6, what="a few samples while single runs", timeout=60)
    assert phase(jobs(cluster, namespace)["single"]) == "Running"
    while_single_ran = [ranks for single, ranks in samples if single == "Running"]
    assert while_single_ran, samples
    assert set(while_single_ran) == {0}, samples
    # Its GPU comes back: Kueue admits both ranks together.
    freed = datetime.now(UTC).replace(microsecond=0)
    cluster.kubectl("delete", "dreamboothjob", "single", "-n", namespace, "--wait=true", "--timeout=120s")
    wait_for("both ranks", lambda: live_pods(cluster, namespace, "gang"), lambda pods: len(pods) == 2, 180, op)
    gang_job = get(cluster, "job.batch", "gang-a0", namespace) or {}
    assert parse_time(gang_job["status"]["startTime"]) >= freed, gang_job["status"]
    wl = workload_of(kueue, namespace, "gang-a0")
    (assignment,) = wl["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2, assignment  # one assignment for both ranks: two GPUs, after "single" gave one back
    assert assignment["resourceUsage"]["nvidia.com/gpu"] == "2", assignment

    # An urgent 1-GPU job preempts the gang as one unit: Kueue evicts its Workload, the batch Job is suspended and
    # both ranks stop together (rank 0 writes the checkpoint on its way out); it waits Queued, no rank running.
    wait_for("the gang training (step >= 3)", lambda: get(cluster, "dreamboothjob", "gang", namespace),
             lambda j: ((j["status"].get("progress") or {}).get("step") or 0) >= 3, TIMEOUT, op)  # fmt: skip
    rank0 = next(
        p["metadata"]["name"]
        for p in live_pods(cluster, namespace, "gang")
        if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"
    )
    urgent = queued_job(s3, bucket, "urgent", steps=10, priority="dreambooth-urgent")
    urgent["spec"]["runPolicy"] = {"preflight": False}  # straight to Kueue (the gang has trained long enough)
    apply(cluster, urgent, namespace)
    requeued = wait_for(
        "the gang queued again, both ranks stopped and gone",
        lambda: get(cluster, "dreamboothjob", "gang", namespace),
        lambda j: phase(j) == "Queued" and not unfinished_pods(cluster, namespace, "gang-a0"),
        120,
        op,
    )
    assert requeued["status"]["reason"] == "Preempted", requeued["status"]
    assert requeued["status"]["restarts"]["preemptions"] == 1, requeued["status"]
    evicted = condition(workload_of(kueue, namespace, "gang-a0"), "Evicted") or {}
    assert evicted.get("reason") == "Preempted", evicted
    stopped = trainer_events(node_agent, namespace, rank0, "preempted")
    assert stopped, node_agent.logs(namespace, rank0)[-2000:]
    stopped_step = stopped[0]["step"]
    assert 3 <= stopped_step < GANG_STEPS

    done = wait_all_finished(cluster, namespace, ["gang", "urgent"], op, node_agent)
    assert {n: phase(done[n]) for n in ("gang", "urgent")} == {"gang": "Succeeded", "urgent": "Succeeded"}, done
    status = done["gang"]["status"]
    assert status["progressText"] == f"{GANG_STEPS}/{GANG_STEPS}"
    assert status["progress"]["stepsRedone"] == 0, status["progress"]
    assert status["restarts"] == {"preemptions": 1, "failures": 0, "total": 1}, status["restarts"]
    assert status.get("attempt", 0) == 0  # the same batch Job, suspended and resumed by Kueue
    # Readmitted as one unit once the urgent job gave its GPU back: two new ranks (indexes 0 and 1) that started
    # after it finished, rank 0 resuming from the step the gang stopped at.
    urgent_done = parse_time((get(cluster, "job.batch", "urgent-a0", namespace) or {})["status"]["completionTime"])
    pods = items(cluster, "pods", namespace, f"{TRAINER},dreambooth.dev/job-name=gang")
    second = [p for p in pods if parse_time(p["metadata"]["creationTimestamp"]) >= urgent_done]
    indexes = sorted(p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] for p in second)
    assert indexes == ["0", "1"], [(p["metadata"]["name"], p["metadata"]["creationTimestamp"]) for p in pods]
    (resumed_rank0,) = [
        p["metadata"]["name"]
        for p in second
        if p["metadata"]["labels"]["batch.kubernetes.io/job-completion-index"] == "0"
    ]
    resumed = trainer_events(node_agent, namespace, resumed_rank0, "resumed")
    assert [e["step"] for e in resumed] == [stopped_step]
    wl = workload_of(kueue, namespace, "gang-a0")
    assert wl["status"]["admission"]["podSetAssignments"][0]["count"] == 2, wl["status"]
