"""`helm install` of charts/dreambooth-operator end to end: the chart's operator Deployment runs the job.

The chart goes in with `helm install` (CRDs, RBAC, ServiceAccount, Deployment, Service, peering, dashboards); the
node agent runs the operator pod from the chart's own image entrypoint, env and probes, as the chart's ServiceAccount
with a token from the TokenRequest API mounted where in-cluster config reads it (tests/infra/helm.py). `helm test`
runs the chart's test pod. A job applied afterwards succeeds; `helm upgrade` with a changed value rolls the operator to
a new pod while the job trains, and the job keeps its steps; `helm uninstall` runs the pre-delete hook (the operator
stopped, its finalizer taken off the job), removes every object of the release and leaves the CRDs and the job, which
can then be deleted. The README's "Install on a cluster" lines are run exactly as written.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

from tests.e2e.test_operator_training import ONE_THREAD, credentials_secret, example, phase, upload_images
from tests.infra.controlplane import Cluster
from tests.infra.helm import HelmRelease, InstalledOperator, local_values, operator_pods, readme_helm_lines
from tests.infra.kubeconfig import write_kubeconfig
from tests.infra.operator import RESTRICTED, condition, get, items, wait_for
from tests.infra.processes import wait_until
from tests.infra.s3 import S3Server

TRAIN_TIMEOUT = 480.0
STEPS = 60
CRDS = ("dreamboothjobs.dreambooth.dev", "inferenceservices.dreambooth.dev", "kopfpeerings.kopf.dev")
# Every kind the chart renders (with its defaults and watchNamespaces), to check that uninstall leaves none.
# Every kind the chart renders (with its defaults and watchNamespaces, hooks included), to check that uninstall leaves
# none.
NAMESPACED_KINDS = (
    *("deployments.apps", "replicasets.apps", "pods", "serviceaccounts", "services", "configmaps", "jobs.batch"),
    *("roles.rbac.authorization.k8s.io", "rolebindings.rbac.authorization.k8s.io", "kopfpeerings.kopf.dev"),
)
TRAINERS = "dreambooth.dev/job-name=minimal"
CLUSTER_KINDS = ("clusterroles.rbac.authorization.k8s.io", "clusterrolebindings.rbac.authorization.k8s.io")
FINALIZER = "dreambooth.dev/operator"  # the operator's (kopf's persistence setting); the uninstall hook removes it


def ready(pod: dict[str, Any]) -> bool:
    return (condition(pod, "Ready") or {}).get("status") == "True" and not pod["metadata"].get("deletionTimestamp")


def leftovers(cluster: Cluster, release: HelmRelease, namespaces: list[str]) -> list[str]:
    """Every object labelled as the release's, in `namespaces` and cluster-wide."""
    kinds: list[tuple[str, list[str]]] = [(",".join(CLUSTER_KINDS), [])] + [
        (",".join(NAMESPACED_KINDS), ["-n", ns]) for ns in namespaces
    ]
    names = [cluster.kubectl("get", k, *where, "-l", release.selector, "-o", "name").stdout for k, where in kinds]
    return sorted(line for text in names for line in text.splitlines() if line.strip())


def _empty(names: list[str]) -> bool:
    return not names


def hook_pod(node_agent: Any, namespace: str, job: str) -> str:
    """The name of the pod of a hook's Job, from the node agent's records (the pod itself is gone with its Job)."""
    pods = (Path(node_agent.state_dir) / "pods" / namespace).iterdir()
    names = [d.name for d in pods if d.name.rsplit("-", 1)[0] == job]
    assert len(names) == 1, names
    return str(names[0])


def trainer_pod_uids(cluster: Cluster, namespace: str) -> set[str]:
    """The training pods of the job `minimal` (attempt 0), not its CPU pre-flight check's."""
    pods = items(cluster, "pods", namespace, TRAINERS)
    return {p["metadata"]["uid"] for p in pods if p["metadata"]["name"].startswith("minimal-a0-")}


def pod_token(node_agent: Any, pod: dict[str, Any]) -> str:
    """The token the node agent wrote into the pod's ServiceAccount token volume (the one the admission added)."""
    mounts = pod["spec"]["containers"][0]["volumeMounts"]
    volume = next(m["name"] for m in mounts if m["mountPath"] == "/var/run/secrets/kubernetes.io/serviceaccount")
    meta = pod["metadata"]
    return str((node_agent.pod_dir(meta["namespace"], meta["name"]) / "volumes" / volume / "token").read_text())


def whoami(cluster: Cluster, token: str, work_dir: Path) -> dict[str, Any] | None:
    """The API server's SelfSubjectReview for `token` (None when the token is rejected)."""
    path = write_kubeconfig(
        work_dir / f"whoami-{uuid.uuid4().hex[:6]}", cluster.server, cluster.ca_file, token, user="x"
    )
    result = cluster.kubectl("auth", "whoami", "-o", "json", kubeconfig=path, check=False)
    return json.loads(result.stdout)["status"]["userInfo"] if result.returncode == 0 else None


def test_helm_install_runs_a_job_survives_an_upgrade_and_uninstalls_cleanly(
    cluster: Cluster, namespace: str, s3: S3Server, node_agent: Any, tmp_path: Path
) -> None:
    # Installed exactly as the README's "Install on a cluster" says (plus the values a machine without pod networks
    # needs, tests/infra/helm.py local_values, and --wait).
    release = HelmRelease.from_readme(cluster.kubeconfig)
    install, helm_test, uninstall = readme_helm_lines()
    assert (install[0], helm_test[0], uninstall[0]) == ("install", "test", "uninstall")
    system = release.namespace
    cluster.kubectl("create", "namespace", system)
    for ns in (system, namespace):  # the operator's pod and the trainers' are admitted under Pod Security restricted
        cluster.kubectl("label", "--overwrite", "namespace", ns, *RESTRICTED)

    operator_log = InstalledOperator(cluster, node_agent, release).log_tail

    try:
        notes = release.install(local_values(watch=[namespace], reconcile_seconds=2))
        assert f"It watches the namespaces {namespace}" in notes
        assert f"helm test {release.name} -n {system}" in notes  # the next commands: the test, and the uninstall
        assert f"Uninstall: helm uninstall {release.name} -n {system}" in notes
        assert release.status()["info"]["status"] == "deployed"
        for crd in CRDS:
            cluster.kubectl("get", "crd", crd)
        # `helm test`, as the README types it: the chart's test pod reads the operator's /healthz and /metrics
        # through its Service and finds dreambooth.dev served (files/hooks/operator_up.py); it is deleted on success.
        release.test(*helm_test)
        (test_hook,) = [h for h in release.status()["hooks"] if h["events"] == ["test"] and h["kind"] == "Job"]
        assert test_hook["last_run"]["phase"] == "Succeeded", test_hook
        test_log = node_agent.logs(system, hook_pod(node_agent, system, test_hook["name"]))
        assert "ok: operator pod dreambooth-operator-" in test_log, test_log
        assert "ok: dreambooth.dev/v1alpha1 serves ['dreamboothjobs', 'inferenceservices']" in test_log, test_log

        # The operator pod: the chart's container, run from the operator image's entrypoint by the node agent.
        (pod,) = wait_for("the operator pod Ready", lambda: operator_pods(cluster, release), lambda p: len(p) == 1)
        assert ready(pod), pod["status"]
        name = pod["metadata"]["name"]
        rendered = next(d for d in release.manifest() if d["kind"] == "Deployment")["spec"]["template"]["spec"]
        container = pod["spec"]["containers"][0]
        assert "command" not in container
        assert container["image"] == rendered["containers"][0]["image"]
        assert container["image"].startswith("ghcr.io/dreambooth-operator/operator:")
        assert {p["httpGet"]["path"] for p in (container["livenessProbe"], container["startupProbe"])} == {"/healthz"}
        account = rendered["serviceAccountName"]
        assert pod["spec"]["serviceAccountName"] == account
        # Its token: from the TokenRequest API, bound to this pod, in the volume the ServiceAccount admission added.
        token = pod_token(node_agent, pod)
        user = whoami(cluster, token, tmp_path)
        assert user is not None
        assert user["username"] == f"system:serviceaccount:{system}:{account}", user
        assert user["extra"]["authentication.kubernetes.io/pod-name"] == [name], user

        # A job applied after the install succeeds, across a `helm upgrade` that rolls the operator mid-training.
        bucket = s3.make_bucket()
        upload_images(s3, bucket, "subjects/dog/")
        credentials_secret(cluster, s3, namespace)
        job = example(s3, bucket)
        job["spec"]["training"].update(
            {"maxSteps": STEPS, "checkpoint": {"intervalSteps": 20, "intervalSeconds": None}}
        )
        job["spec"]["podTemplate"] = {"env": list(ONE_THREAD)}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(job))
        steps: list[int] = []

        def fetch() -> dict[str, Any] | None:
            obj = get(cluster, "dreamboothjob", "minimal", namespace)
            step = (((obj or {}).get("status") or {}).get("progress") or {}).get("step")
            if step is not None:
                steps.append(int(step))
            return obj

        def training(j: dict[str, Any]) -> bool:
            return phase(j) == "Running" and ((j["status"].get("progress") or {}).get("step") or 0) >= 1

        try:
            wait_for("the job training (step >= 1)", fetch, training, TRAIN_TIMEOUT)
        except Exception as err:
            raise AssertionError(f"{err}\n{operator_log()}") from err
        trainer_uids = trainer_pod_uids(cluster, namespace)
        assert len(trainer_uids) == 1, trainer_uids
        release.upgrade("--set=verbose=true")
        (new,) = wait_for("one new operator pod", lambda: operator_pods(cluster, release), lambda p: len(p) == 1)
        assert new["metadata"]["name"] != name
        assert ready(new)
        mid = fetch()
        assert phase(mid) == "Running", f"the job was not in flight across the upgrade: {mid}"
        env = {e["name"]: e.get("value") for e in new["spec"]["containers"][0]["env"]}
        assert env["DREAMBOOTH_OPERATOR_VERBOSE"] == "true"
        assert release.status()["version"] == 2
        # The first pod is gone, and with it its bound token: the API server refuses it once its cache of
        # successful authentications (10 s) lets go of it.
        wait_until(
            lambda: whoami(cluster, token, tmp_path) is None,
            what="the first pod's token to be refused",
            timeout=60,
            interval=1.0,
        )
        new_token = pod_token(node_agent, new)

        done = wait_for("the job finished", fetch, lambda j: phase(j) in ("Succeeded", "Failed"), TRAIN_TIMEOUT)
        status = done["status"]
        assert phase(done) == "Succeeded", json.dumps(status, indent=1) + operator_log()
        assert status["progressText"] == f"{STEPS}/{STEPS}"
        assert status["progress"]["stepsRedone"] == 0
        assert status["restarts"]["total"] == 0
        assert status["attempt"] == 0
        # Progress never went back: the new operator went on from what the trainer reported, in the same pod.
        assert steps, steps
        assert steps == sorted(steps), steps
        assert trainer_pod_uids(cluster, namespace) == trainer_uids
        attempts = [j["metadata"]["name"] for j in items(cluster, "jobs.batch", namespace)]
        assert [a for a in attempts if a != "minimal-check"] == ["minimal-a0"], attempts  # (and the CPU pre-flight)
        new_log = node_agent.logs(system, new["metadata"]["name"])
        assert "minimal" in new_log, new_log[-3000:]  # the new operator handled the job (verbose logs name it)

        # A job the release still handles when it goes: queued for a LocalQueue that no Kueue serves, it stays Queued
        # (its batch Job suspended, no pod) and holds the operator's finalizer (kopf drops it from finished jobs).
        parked = example(s3, bucket)
        parked["metadata"]["name"] = "parked"
        parked["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "no-kueue-here"}
        parked["spec"]["output"]["uri"] = f"s3://{bucket}/models/parked/"
        parked["spec"]["runPolicy"] = {"preflight": False}
        cluster.kubectl("apply", "-n", namespace, "-f", "-", input=json.dumps(parked))
        wait_for(
            "parked Queued, with the operator's finalizer",
            lambda: get(cluster, "dreamboothjob", "parked", namespace),
            lambda j: phase(j) == "Queued" and FINALIZER in (j["metadata"].get("finalizers") or []),
            60,
        )

        # Uninstall, as the README types it: the pre-delete hook stops the operator and takes its finalizer off the
        # parked job; then no object of the release is left; the CRDs and the user's jobs stay, and can be deleted.
        assert leftovers(cluster, release, [system, namespace])  # (the check below can see them)
        release.helm(*uninstall, "--wait", "--timeout=180s", timeout=240)
        # helm deletes the Deployment with background propagation: its ReplicaSet and pod go a moment later.
        wait_for("no object of the release", lambda: leftovers(cluster, release, [system, namespace]), _empty, 120)
        for crd in CRDS:
            cluster.kubectl("get", "crd", crd)
        assert phase(get(cluster, "dreamboothjob", "minimal", namespace)) == "Succeeded"
        kept = get(cluster, "dreamboothjob", "parked", namespace) or {}
        assert FINALIZER not in (kept["metadata"].get("finalizers") or []), kept["metadata"]
        assert phase(kept) == "Queued"  # untouched otherwise
        hook_log = node_agent.logs(system, hook_pod(node_agent, system, f"{release.fullname}-uninstall"))
        assert f"dreamboothjobs/parked in {namespace}: finalizer {FINALIZER} removed" in hook_log, hook_log
        assert "nothing deleted" in hook_log, hook_log
        assert release.name not in cluster.kubectl("get", "secrets", "-n", system, "-o", "name").stdout
        # The pod's token was bound to the pod: with the pod gone, the API server rejects it (once its cache of
        # recent authentications, 10 s, no longer holds the operator's last request).
        wait_for("the token rejected", lambda: whoami(cluster, new_token, tmp_path) is None, bool, 30)
        # With no operator and no finalizer, the jobs go at once (a finalizer left behind would hold them forever).
        cluster.kubectl("delete", "dreamboothjob", "minimal", "parked", "-n", namespace, "--wait=true", "--timeout=30s")
    finally:
        release.helm("uninstall", release.name, "-n", system, "--ignore-not-found", "--no-hooks")
        cluster.kubectl("delete", "namespace", system, "--wait=false", check=False)
