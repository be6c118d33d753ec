"""InferenceService: model resolution from a job, the Deployment/Service builders, status, and what wakes its loop."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import kopf
import pytest

from dreambooth_api.inference import ServerLimits
from dreambooth_operator.builders import build_batch_job
from dreambooth_operator.handlers import inference as inference_handlers
from dreambooth_operator.handlers import jobs as job_handlers
from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.inference import build_service, reconcile_inference
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings
from tests.infra.wrappers import T0, make_job, make_pod

# NetworkPolicies have their own tests (test_operator_networkpolicies.py).
SETTINGS = OperatorSettings(trainer_image="trainer:test", network_policies=False)
OWNER = {
    "apiVersion": "dreambooth.dev/v1alpha1",
    "kind": "InferenceService",
    "name": "dog",
    "uid": "uid-dog",
    "controller": True,
    "blockOwnerDeletion": True,
}
LABELS = {
    "dreambooth.dev/inference-service": "dog",
    "dreambooth.dev/component": "inference",
    "app.kubernetes.io/managed-by": "dreambooth-operator",
}


def isvc(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dreambooth.dev/v1alpha1",
        "kind": "InferenceService",
        "metadata": {"name": "dog", "namespace": "ns", "uid": "uid-dog", "generation": 2},
        "spec": {"model": {"fromJob": "cat"}, **spec},
    }


def source(phase: str, model_uri: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "message": "boom" if phase == "Failed" else None}
    if model_uri:
        status["outputs"] = {"modelUri": model_uri}
    return {"metadata": {"name": "cat"}, "spec": {"baseModel": {"tiny": True}}, "status": status}


@pytest.mark.parametrize(
    ("job", "phase", "reason"),
    [
        (None, "Pending", "WaitingForJob"),  # it may be created after the service (issue 20)
        (source("Running"), "Pending", "WaitingForJob"),
        (source("Failed"), "Failed", "SourceJobFailed"),
    ],
)
def test_unresolved_model(job: dict[str, Any] | None, phase: str, reason: str) -> None:
    plan = reconcile_inference(isvc(), job, None, SETTINGS, T0)
    assert plan.children == []
    assert plan.status.phase == phase
    assert [(c.type, c.status.value, c.reason) for c in plan.status.conditions] == [
        ("ModelResolved", "False", reason),
        ("Ready", "False", reason),
    ]


def test_from_a_succeeded_job() -> None:
    job = source("Succeeded", "s3://bkt/out/model")
    plan = reconcile_inference(isvc(scaling={"replicas": 2}), job, None, SETTINGS, T0)
    deployment, service = plan.children
    assert plan.status.phase == "Loading"
    assert plan.status.model_uri == "s3://bkt/out/model"
    assert plan.status.url == "http://dog.ns.svc:80"
    assert service == build_service(isvc())
    assert deployment["metadata"] == {
        "name": "dog",
        "namespace": "ns",
        "labels": LABELS,
        "ownerReferences": [OWNER],
    }
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["selector"] == {"matchLabels": {"dreambooth.dev/inference-service": "dog"}}
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"]) == {
        "modelUri": "s3://bkt/out/model",
        "baseModel": {"tiny": True},
        "adapters": [],
        "server": {
            "maxBatchSize": 4,
            "maxImagesPerRequest": 4,
            "maxSteps": 50,
            "maxResolution": 768,
            "defaultScheduler": "euler",
            "defaultSteps": 25,
            "defaultGuidanceScale": 7.5,
        },
        "storage": {"addressingStyle": "auto"},
    }
    assert container["command"] == ["dreambooth-serve"]
    assert container["resources"] == {"requests": {"nvidia.com/gpu": "1"}, "limits": {"nvidia.com/gpu": "1"}}
    two = rolled_out(deployment, replicas=2, updatedReplicas=2)
    ready = reconcile_inference(isvc(scaling={"replicas": 2}), job, two, SETTINGS, T0)
    assert ready.status.phase == "Ready"
    assert ready.status.ready_replicas == 1
    assert ready.status.message == "1/2 replicas ready at http://dog.ns.svc:80"
    assert ("Normal", "ReplicasReady") in [(t, r) for t, r, _ in ready.events]


def test_model_uri_with_adapters_auth_and_credentials() -> None:
    spec = {
        "model": {"modelUri": "s3://bkt/base", "baseModel": {"tiny": True}},
        "adapters": [{"name": "a", "uri": "s3://bkt/lora", "weight": 0.5}],
        "auth": {"bearerTokenSecret": {"name": "tok"}},
        "storage": {"credentialsSecret": {"name": "s3"}},
        "resources": {"gpus": 0},
    }
    plan = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0)
    container = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["DREAMBOOTH_SERVE_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "tok", "key": "token"}}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert json.loads(env["DREAMBOOTH_SERVE_CONFIG"]["value"])["adapters"] == [
        {"name": "a", "uri": "s3://bkt/lora", "weight": 0.5}
    ]
    assert container["resources"] == {}


@pytest.mark.parametrize(("spec_resource", "expected"), [(None, "example.com/gpu"), ("amd.com/gpu", "amd.com/gpu")])
def test_gpu_resource_is_the_spec_value_or_the_operator_setting(spec_resource: str | None, expected: str) -> None:
    settings = SETTINGS.model_copy(update={"gpu_resource_name": "example.com/gpu"})
    resources: dict[str, Any] = {"gpus": 2} | ({"gpuResourceName": spec_resource} if spec_resource else {})
    spec = {"model": {"modelUri": "s3://bkt/base"}, "resources": resources}
    plan = reconcile_inference(isvc(**spec), None, None, settings, T0)
    container = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"] == {"requests": {expected: "2"}, "limits": {expected: "2"}}


def test_serving_pods_share_the_model_cache_volume_when_configured() -> None:
    spec = {"model": {"modelUri": "s3://bkt/lora", "baseModel": {"id": "org/sd"}}, "resources": {"gpus": 0}}
    pod = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0).children[0]["spec"]["template"]["spec"]
    assert "volumes" not in pod
    settings = SETTINGS.model_copy(update={"model_cache_volume": {"persistentVolumeClaim": {"claimName": "mc"}}})
    pod = reconcile_inference(isvc(**spec), None, None, settings, T0).children[0]["spec"]["template"]["spec"]
    assert pod["volumes"] == [{"name": "model-cache", "persistentVolumeClaim": {"claimName": "mc"}}]
    container = pod["containers"][0]
    assert container["volumeMounts"] == [{"name": "model-cache", "mountPath": "/var/cache/dreambooth"}]
    assert {"name": "DREAMBOOTH_MODEL_CACHE_DIR", "value": "/var/cache/dreambooth"} in container["env"]
    assert pod["securityContext"]["fsGroup"] == 10001


NEW = "s3://bkt/out/new"
OLD = "s3://bkt/out/old"


def rolled_out(built: dict[str, Any], *, generation: int = 1, observed: int = 1, **counts: int) -> dict[str, Any]:
    """A built Deployment as the cluster would return it, with a rollout status (one ready new pod by default)."""
    status = {"observedGeneration": observed, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1} | counts
    return built | {"metadata": built["metadata"] | {"generation": generation}, "status": status}


def served(model_uri: str, **rollout: int) -> dict[str, Any]:
    """The Deployment built for `model_uri`, with a rollout status."""
    built = reconcile_inference(isvc(model={"modelUri": model_uri}), None, None, SETTINGS, T0).children[0]
    return rolled_out(built, **rollout)


def serving(model_uri: str, served_model_uri: str | None = OLD) -> dict[str, Any]:
    """An InferenceService whose last status says it serves `served_model_uri`."""
    return isvc(model={"modelUri": model_uri}) | {"status": {"servedModelUri": served_model_uri}}


@pytest.mark.parametrize(
    ("deployment", "phase", "reason", "served_uri"),
    [
        # The spec just changed: the Deployment still has the old template, fully rolled out.
        (served(OLD), "Loading", "RollingOut", OLD),
        # The new template is applied but the Deployment controller has not seen it yet.
        (served(NEW, generation=2, observed=1), "Loading", "RollingOut", OLD),
        # The new pod is not ready (for example crash-looping): the old one still serves.
        (served(NEW, generation=2, observed=2, replicas=2, updatedReplicas=1), "Loading", "RollingOut", OLD),
        # The new pod is ready but the old one is not gone yet.
        (served(NEW, generation=2, observed=2, replicas=2, readyReplicas=2), "Loading", "RollingOut", OLD),
        # Only new pods remain and one is ready.
        (served(NEW, generation=2, observed=2), "Ready", "ReplicasReady", NEW),
        # Only new pods remain, none ready.
        (served(NEW, generation=2, observed=2, readyReplicas=0), "Loading", "ReplicasNotReady", None),
    ],
)
def test_ready_only_when_every_ready_replica_serves_the_new_model(
    deployment: dict[str, Any], phase: str, reason: str, served_uri: str | None
) -> None:
    plan = reconcile_inference(serving(NEW), None, deployment, SETTINGS, T0)
    ready = next(c for c in plan.status.conditions if c.type == "Ready")
    assert (plan.status.phase, ready.status.value, ready.reason) == (phase, str(phase == "Ready"), reason)
    assert (plan.status.model_uri, plan.status.served_model_uri) == (NEW, served_uri)


def test_served_model_is_read_from_a_rolled_out_deployment() -> None:
    # No earlier status (an operator restart): the complete Deployment's own config says which model it serves.
    plan = reconcile_inference(serving(NEW, None), None, served(OLD), SETTINGS, T0)
    assert plan.status.served_model_uri == OLD
    assert OLD in (plan.status.message or "")
    assert plan.status.to_wire()["servedModelUri"] == OLD


@pytest.mark.parametrize("target", [None, 5])
def test_autoscaling_creates_an_hpa_on_in_flight_requests_and_leaves_replicas_to_it(target: int | None) -> None:
    scaling = {"minReplicas": 1, "maxReplicas": 4} | ({"targetInflightRequests": target} if target else {})
    plan = reconcile_inference(isvc(scaling=scaling), source("Succeeded", NEW), None, SETTINGS, T0)
    deployment, service, hpa = plan.children
    assert plan.stale == []
    assert deployment["spec"]["replicas"] == 1  # a new Deployment starts at minReplicas
    assert service["kind"] == "Service"
    assert hpa == {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "dog", "namespace": "ns", "labels": LABELS, "ownerReferences": [OWNER]},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "dog"},
            "minReplicas": 1,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": "dreambooth_serve_inflight_requests"},
                        "target": {"type": "AverageValue", "averageValue": str(target or 2)},
                    },
                }
            ],
        },
    }


@pytest.mark.parametrize(
    ("scaling", "replicas"), [({}, 1), ({"replicas": 3}, 3), ({"minReplicas": 2, "maxReplicas": 2}, 2)]
)
def test_fixed_replicas_have_no_hpa_and_a_leftover_one_is_deleted(scaling: dict[str, int], replicas: int) -> None:
    plan = reconcile_inference(isvc(scaling=scaling), source("Succeeded", NEW), None, SETTINGS, T0)
    assert [c["kind"] for c in plan.children] == ["Deployment", "Service"]
    assert plan.children[0]["spec"]["replicas"] == replicas
    assert plan.stale == [("autoscaling/v2", "HorizontalPodAutoscaler", "dog")]


def test_autoscaled_readiness_counts_the_replicas_the_hpa_chose() -> None:
    spec = {"model": {"modelUri": NEW}, "scaling": {"minReplicas": 1, "maxReplicas": 4}}
    built = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0).children[0]
    deployment = rolled_out(built, replicas=3, updatedReplicas=3, readyReplicas=2)
    deployment["spec"] = deployment["spec"] | {"replicas": 3}  # set by the HPA
    plan = reconcile_inference(isvc(**spec), None, deployment, SETTINGS, T0)
    assert plan.status.phase == "Ready"
    assert plan.status.message == "2/3 replicas ready at http://dog.ns.svc:80"


AUTOSCALED = {"minReplicas": 2, "maxReplicas": 5}
OPERATOR, HANDOVER = "dreambooth-operator", "dreambooth-operator-handover"


def owner(manager: str, operation: str = "Apply") -> dict[str, Any]:
    """A managedFields entry in which `manager` owns the Deployment's spec.replicas."""
    fields: dict[str, Any] = {"f:spec": {"f:replicas": {}}}
    return {"manager": manager, "operation": operation, "fieldsType": "FieldsV1", "fieldsV1": fields}


def live(scaling: dict[str, int], replicas: int, *owners: dict[str, Any]) -> dict[str, Any]:
    """The Deployment built for `scaling`, as the API returns it: `replicas` running, its managedFields `owners`."""
    built = reconcile_inference(isvc(model={"modelUri": NEW}, scaling=scaling), None, None, SETTINGS, T0).children[0]
    deployment = rolled_out(built, replicas=replicas, updatedReplicas=replicas, readyReplicas=replicas)
    deployment["metadata"] = deployment["metadata"] | {"managedFields": list(owners)}
    deployment["spec"] = deployment["spec"] | {"replicas": replicas}
    return deployment


def handover(replicas: int) -> dict[str, Any]:
    meta = {"name": "dog", "namespace": "ns"}
    return {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta, "spec": {"replicas": replicas}}


@pytest.mark.parametrize(
    ("scaling", "deployment", "applied", "expected_handover"),
    [
        # A new autoscaled Deployment starts at minReplicas (the HPA scales it from there).
        (AUTOSCALED, None, 2, None),
        # Fixed (3 replicas, the operator's apply owns the count) -> autoscaling: the count is left out of the
        # operator's apply, and first handed over at its live value, so that it is not reset to the default of 1.
        (AUTOSCALED, live({"replicas": 3}, 3, owner(OPERATOR)), None, handover(3)),
        # The same after the Deployment was created at minReplicas.
        (AUTOSCALED, live(AUTOSCALED, 2, owner(OPERATOR)), None, handover(2)),
        # Scaled to zero -> autoscaling: raised to minReplicas first (an HPA does not act on a Deployment at zero).
        (AUTOSCALED, live({"replicas": 0}, 0, owner(OPERATOR)), 2, None),
        # Handed over (or scaled by the HPA since): the operator neither sets nor hands over the count again.
        (AUTOSCALED, live(AUTOSCALED, 2, owner(HANDOVER)), None, None),
        (AUTOSCALED, live(AUTOSCALED, 4, owner("kube-controller-manager", "Update")), None, None),
        # Autoscaling -> fixed: the fixed count is applied (the HPA is stale, see below), nothing is handed over.
        (
            {"replicas": 3},
            live(AUTOSCALED, 4, owner(HANDOVER), owner("kube-controller-manager", "Update")),
            3,
            None,
        ),
    ],
    ids=["new", "fixed-to-autoscaled", "created-at-min", "zero-to-autoscaled", "handed-over", "hpa-scaled", "to-fixed"],
)
def test_the_replica_count_is_the_operators_or_the_hpas_never_both(
    scaling: dict[str, int], deployment: dict[str, Any] | None, applied: int | None, expected_handover: Any
) -> None:
    plan = reconcile_inference(isvc(model={"modelUri": NEW}, scaling=scaling), None, deployment, SETTINGS, T0)
    built = plan.children[0]
    assert built["spec"].get("replicas") == applied
    assert plan.handover == expected_handover
    kinds = [c["kind"] for c in plan.children]
    if "maxReplicas" in scaling:
        assert (kinds, plan.stale) == (["Deployment", "Service", "HorizontalPodAutoscaler"], [])
    else:
        assert (kinds, plan.stale) == (
            ["Deployment", "Service"],
            [("autoscaling/v2", "HorizontalPodAutoscaler", "dog")],
        )


@pytest.mark.parametrize(
    ("shared_memory", "volumes"),
    [
        (None, None),
        ("2Gi", [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}]),
    ],
)
def test_shared_memory_mounts_a_memory_backed_dev_shm(shared_memory: str | None, volumes: Any) -> None:
    resources: dict[str, Any] = {"gpus": 0} | ({"sharedMemory": shared_memory} if shared_memory else {})
    plan = reconcile_inference(isvc(model={"modelUri": "s3://bkt/m"}, resources=resources), None, None, SETTINGS, T0)
    pod = plan.children[0]["spec"]["template"]["spec"]
    assert pod.get("volumes") == volumes
    mounts = None if volumes is None else [{"name": "dshm", "mountPath": "/dev/shm"}]
    assert pod["containers"][0].get("volumeMounts") == mounts
    assert pod["containers"][0]["terminationMessagePolicy"] == "FallbackToLogsOnError"


def crashed(message: str, exit_code: int = 1, finished: str = "2026-01-01T00:00:10Z") -> dict[str, Any]:
    """A serving pod whose server exited with `message` and now waits in CrashLoopBackOff."""
    terminated = {"exitCode": exit_code, "reason": "Error", "message": message, "finishedAt": finished}
    return {
        "metadata": {"name": "dog-abc"},
        "status": {
            "containerStatuses": [
                {
                    "name": "server",
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": terminated},
                }
            ]
        },
    }


LOAD_ERROR = json.dumps({"status": "failed", "reason": "ModelLoadFailed", "message": "ValueError: Invalid LoRA"})


@pytest.mark.parametrize(
    ("pods", "phase", "reason", "message"),
    [
        ([], "Loading", "ReplicasNotReady", "0/1 replicas ready; loading the model"),
        ([crashed(LOAD_ERROR, exit_code=0)], "Loading", "ReplicasNotReady", "0/1 replicas ready; loading the model"),
        (
            [crashed("old", finished="2026-01-01T00:00:01Z"), crashed(LOAD_ERROR)],
            "Failed",
            "ModelLoadFailed",
            "the server failed to load the model: ValueError: Invalid LoRA",
        ),
        (
            [crashed("Traceback ...\nOSError: disk full")],
            "Failed",
            "ModelLoadFailed",
            "the server failed to load the model: Traceback ...\nOSError: disk full",
        ),
    ],
)
def test_a_failed_model_load_is_reported_from_the_pods(
    pods: list[dict[str, Any]], phase: str, reason: str, message: str
) -> None:
    deployment = served(NEW, generation=2, observed=2, readyReplicas=0)
    plan = reconcile_inference(serving(NEW), None, deployment, SETTINGS, T0, pods)
    ready = next(c for c in plan.status.conditions if c.type == "Ready")
    assert (plan.status.phase, ready.reason, plan.status.message) == (phase, reason, message)
    if reason == "ModelLoadFailed":
        assert ("Warning", "ModelLoadFailed", message) in plan.events


def test_a_failed_load_mid_rollout_keeps_the_old_replicas_serving() -> None:
    deployment = served(NEW, generation=2, observed=2, replicas=2, updatedReplicas=1)
    plan = reconcile_inference(serving(NEW), None, deployment, SETTINGS, T0, [crashed(LOAD_ERROR)])
    assert plan.status.phase == "Loading"
    assert plan.status.message == (
        f"rolling out {NEW}: 1 ready, old replicas still serve {OLD}; "
        "a new replica failed to load the model: ValueError: Invalid LoRA"
    )


def test_max_batch_size_documents_batching_and_chunks() -> None:
    description = ServerLimits.model_fields["max_batch_size"].description or ""
    assert "Concurrent compatible requests" in description
    assert "its images generated in chunks of this size" in description


def test_serving_pods_probe_liveness_and_readiness_apart() -> None:
    """Issue 15: readiness waits for /readyz (loaded and warmed up); /healthz keeps a loading server alive, with a
    startup probe long enough for a large model's download."""
    spec = {"model": {"modelUri": "s3://bkt/base", "baseModel": {"tiny": True}}, "resources": {"gpus": 0}}
    plan = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0)
    container = plan.children[0]["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800


def pod_event_handlers(labels: Mapping[str, str]) -> list[Any]:
    """The kopf event handlers that a pod with `labels` is routed to (their resource and label filters)."""
    pods = kopf.Resource("", "v1", "pods")
    routed = []
    for handler in kopf.get_default_registry()._watching.get_all_handlers():
        wanted = handler.labels or {}
        if (
            handler.selector is not None
            and handler.selector.check(pods)
            and all(key in labels and (value is kopf.PRESENT or labels[key] == value) for key, value in wanted.items())
        ):
            routed.append(handler.fn)
    return routed


def operator_state() -> OperatorState:
    """The operator's in-memory state, without an API client (the wake handlers never call the API)."""
    poller = ProgressPoller(concurrency=1, timeout_seconds=1, interval_seconds=10, port=1)
    return OperatorState(settings=SETTINGS, api=None, metrics=OperatorMetrics(), poller=poller)


def test_a_serving_pod_event_wakes_its_inference_service_loop() -> None:
    """A serving pod that crashed on its model load is reported at once, not at the next periodic reconcile."""
    state = operator_state()
    service_key, job_key = ("ns", "inferenceservice/dog"), ("ns", "dog")
    wakes = {key: state.wakes.setdefault(key, asyncio.Event()) for key in (service_key, job_key)}
    serving = reconcile_inference(isvc(model={"modelUri": NEW}), None, None, SETTINGS, T0).children[0]
    labels = serving["spec"]["template"]["metadata"]["labels"]
    routed = pod_event_handlers(labels)
    assert routed == [inference_handlers.wake_on_serving_pod]
    for fn in routed:
        fn(namespace="ns", labels=labels, memo={"state": state}, type="MODIFIED")
    assert wakes[service_key].is_set()
    assert not wakes[job_key].is_set()
    # A training pod of a job with the same name still wakes the job's loop only.
    training = make_pod(make_job("dog", "ns").obj(), attempt=0, rank=0).obj()["metadata"]["labels"]
    assert pod_event_handlers(training) == [job_handlers.wake_on_pod]


def test_only_a_finished_or_deleted_job_wakes_the_services_that_serve_it() -> None:
    """Progress writes of a running job do not make its services reconcile; its end does, at once."""
    state = operator_state()
    served = state.wakes.setdefault(("ns", "inferenceservice/dog-server"), asyncio.Event())
    other = state.wakes.setdefault(("ns", "inferenceservice/cat-server"), asyncio.Event())
    spec = isvc(model={"fromJob": "dog"})["spec"]
    index = {
        ("ns", "dog"): [
            inference_handlers.services_by_source_job(namespace="ns", name="dog-server", spec=spec)[("ns", "dog")]
        ]
    }
    assert (
        inference_handlers.services_by_source_job(namespace="ns", name="x", spec={"model": {"modelUri": NEW}}) is None
    )
    for event, phase, woken in [
        ("MODIFIED", "Running", False),
        ("MODIFIED", "Succeeded", True),
        ("DELETED", None, True),
    ]:
        served.clear()
        status = {"phase": phase} if phase else {}
        job_handlers.wake_on_job(
            namespace="ns", name="dog", memo={"state": state}, type=event, status=status, services_by_source_job=index
        )
        assert served.is_set() is woken, (event, phase)
        assert not other.is_set()


@pytest.mark.parametrize(
    ("secret", "extra"),
    [
        ({"name": "s3"}, []),
        (
            {"name": "s3", "sessionTokenKey": "token"},
            [{"name": "AWS_SESSION_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "token"}}}],
        ),
    ],
)
def test_serving_pods_get_the_credentials_training_pods_get(secret: dict[str, str], extra: list[Any]) -> None:
    spec = {"model": {"modelUri": NEW}, "storage": {"credentialsSecret": secret}}
    pod = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0).children[0]["spec"]["template"]["spec"]
    env = [e for e in pod["containers"][0]["env"] if e["name"].startswith("AWS_")]
    assert env == [
        {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_ACCESS_KEY_ID"}}},
        {
            "name": "AWS_SECRET_ACCESS_KEY",
            "valueFrom": {"secretKeyRef": {"name": "s3", "key": "AWS_SECRET_ACCESS_KEY"}},
        },
        *extra,
    ]
    # The same variables as a training pod of the same storage section.
    job = make_job().storage(credentialsSecret=secret).obj()
    training = build_batch_job(job, 0, SETTINGS)["spec"]["template"]["spec"]["containers"][0]["env"]
    assert [e for e in training if e["name"].startswith("AWS_")] == env


@pytest.mark.parametrize(("automount", "expected"), [(None, False), (True, True)])
def test_serving_pods_mount_no_service_account_token_unless_asked(automount: bool | None, expected: bool) -> None:
    template = {} if automount is None else {"automountServiceAccountToken": automount}
    spec = {"model": {"modelUri": NEW}, "podTemplate": template}
    pod = reconcile_inference(isvc(**spec), None, None, SETTINGS, T0).children[0]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is expected
