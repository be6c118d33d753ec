"""The test node agent against a real control plane: scheduler, Deployment, Job and Eviction controllers.

Every pod here runs a small ``python -c`` program as a local process; the tests observe it only through the
Kubernetes API, ``kubectl logs`` and the agent's log accessor.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch

from tests.infra.paths import TOOLS_BIN
from tests.infra.processes import NotReadyError, wait_until
from tests.nodeagent.config import AgentConfig
from tests.nodeagent.plugin import NodeAgent, NodeAgentError
from tests.nodeagent.runtime import wait_process_exit

TIMEOUT_S = 90.0
INDEX_PATH = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
PYTHON = "python"


def wait_for(what: str, condition: Callable[[], Any], agent: NodeAgent, timeout: float = TIMEOUT_S) -> Any:
    """Poll ``condition`` (the shared ``wait_until``) until it returns something truthy, and return that.

    An exception from ``condition`` counts as "not yet" (an API object or pod file not there yet; the last one is
    reported); an agent that died ends the wait at once. The error shows the agent's log tail."""
    result: list[Any] = [None]

    def check() -> bool:
        try:
            agent.check()
        except NodeAgentError as exc:
            raise NotReadyError(str(exc)) from exc
        result[0] = condition()
        return bool(result[0])

    wait_until(check, what=what, timeout=timeout, details=agent.log_tail)
    return result[0]


@pytest.fixture
def api(cluster: Any) -> Iterator[client.ApiClient]:
    api_client = cluster.api_client()
    yield api_client
    api_client.close()


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


@pytest.fixture
def batch(api: client.ApiClient) -> client.BatchV1Api:
    return client.BatchV1Api(api)


def as_dict(api: client.ApiClient, obj: Any) -> dict[str, Any]:
    result: dict[str, Any] = api.sanitize_for_serialization(obj)
    return result


def get_pod(core: client.CoreV1Api, namespace: str, name: str) -> dict[str, Any] | None:
    try:
        return as_dict(core.api_client, core.read_namespaced_pod(name, namespace))
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def pod_in_phase(core: client.CoreV1Api, namespace: str, name: str, *phases: str) -> dict[str, Any] | None:
    """The pod when it is in one of ``phases``, else None."""
    pod = get_pod(core, namespace, name)
    return pod if pod is not None and pod.get("status", {}).get("phase") in phases else None


def condition(obj: dict[str, Any], ctype: str) -> dict[str, Any] | None:
    return next((c for c in obj.get("status", {}).get("conditions") or [] if c["type"] == ctype), None)


def job_pods(core: client.CoreV1Api, namespace: str, job: str) -> list[dict[str, Any]]:
    pods = core.list_namespaced_pod(namespace, label_selector=f"batch.kubernetes.io/job-name={job}")
    return [as_dict(core.api_client, p) for p in pods.items]


def completion_index(pod: dict[str, Any]) -> str:
    return str(pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def script(body: str) -> list[str]:
    return [PYTHON, "-c", textwrap.dedent(body)]


def indexed_job(name: str, command: list[str], *, env: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """An Indexed Job shaped like the operator's: 2 ranks, DisruptionTarget ignored, exit code 10 fails the Job."""
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "completionMode": "Indexed",
            "completions": 2,
            "parallelism": 2,
            "backoffLimit": 6,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {"action": "FailJob", "onExitCodes": {"containerName": "main", "operator": "In", "values": [10]}},
                ]
            },
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "subdomain": name,
                    "terminationGracePeriodSeconds": 10,
                    "containers": [
                        {
                            "name": "main",
                            "image": "trainer:test",
                            "command": command,
                            "env": [
                                {
                                    "name": "RANK",
                                    "valueFrom": {"fieldRef": {"fieldPath": INDEX_PATH}},
                                },
                                *(env or []),
                            ],
                            "resources": {"limits": {"nvidia.com/gpu": "1"}},
                        }
                    ],
                }
            },
        },
    }


def job_condition(batch: client.BatchV1Api, namespace: str, name: str, ctype: str) -> dict[str, Any] | None:
    job = as_dict(batch.api_client, batch.read_namespaced_job(name, namespace))
    found = condition(job, ctype)
    return job if found and found["status"] == "True" else None


class PodRecorder:
    """Every pod state a watch delivers in a namespace (to see short-lived states such as Failed-before-delete)."""

    def __init__(self, core: client.CoreV1Api, namespace: str) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._watch = watch.Watch()
        self._core = core
        self._namespace = namespace
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        stream = self._watch.stream(self._core.list_namespaced_pod, self._namespace, timeout_seconds=300)
        for event in stream:
            self.events.append((event["type"], as_dict(self._core.api_client, event["object"])))

    def states(self, uid: str) -> list[dict[str, Any]]:
        return [obj for _, obj in list(self.events) if obj["metadata"]["uid"] == uid]

    def stop(self) -> None:
        self._watch.stop()


# ---- (1) a Deployment: scheduling, readiness, logs (also through kubectl), SIGTERM on delete -----------------------
WEB_SERVER = """
import http.server, os, pathlib, signal, sys

def on_term(signum, frame):
    pathlib.Path("sigterm").write_text("SIGTERM")
    print("got SIGTERM", flush=True)
    sys.exit(0)

signal.signal(signal.SIGTERM, on_term)
print("serving on", os.environ["POD_IP"], flush=True)
http.server.HTTPServer((os.environ["POD_IP"], 8080), http.server.SimpleHTTPRequestHandler).serve_forever()
"""


def test_deployment_pod_runs_becomes_ready_logs_and_gets_sigterm(
    cluster: Any, namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    apps = client.AppsV1Api(core.api_client)
    container = {
        "name": "web",
        "image": "web:test",
        "command": script(WEB_SERVER),
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "ports": [{"name": "http", "containerPort": 8080}],
        "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
        "resources": {"limits": {"nvidia.com/gpu": "1"}},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"terminationGracePeriodSeconds": 20, "containers": [container]},
            },
        },
    }
    apps.create_namespaced_deployment(namespace, deployment)

    def ready_pod() -> dict[str, Any] | None:
        for pod in core.list_namespaced_pod(namespace, label_selector="app=web").items:
            d = as_dict(core.api_client, pod)
            ready = condition(d, "Ready")
            if ready and ready["status"] == "True":
                return d
        return None

    pod = wait_for("the web pod to be Ready", ready_pod, node_agent)
    name, uid = pod["metadata"]["name"], pod["metadata"]["uid"]
    assert pod["spec"]["nodeName"] in node_agent.nodes
    assert pod["status"]["phase"] == "Running"
    pod_ip = pod["status"]["podIP"]
    assert pod_ip.startswith("127.")
    assert pod_ip != "127.0.0.1"
    assert pod["status"]["containerStatuses"][0]["state"]["running"]
    for ctype in ("PodScheduled", "Initialized", "ContainersReady", "Ready"):
        assert condition(pod, ctype)["status"] == "True", ctype  # type: ignore[index]

    # The readiness probe really reached the server: its access log shows the GETs (the log pump may lag a bit).
    wait_for(
        "a probe in the access log", lambda: '"GET / HTTP/1.1" 200' in node_agent.logs(namespace, name), node_agent
    )
    assert node_agent.logs(namespace, name).startswith(f"serving on {pod_ip}\n")
    kubectl_logs = cluster.kubectl("logs", "-n", namespace, name).stdout
    assert f"serving on {pod_ip}" in kubectl_logs
    tail = cluster.kubectl("logs", "-n", namespace, name, "--tail=1", "--timestamps").stdout
    assert len(tail.splitlines()) == 1
    stamp = tail.split(" ", 1)[0]
    assert stamp[:4].isdigit()
    assert "T" in stamp

    workdir = node_agent.workdir(namespace, name)
    core.delete_namespaced_pod(name, namespace)

    def gone() -> bool:
        current = get_pod(core, namespace, name)
        return current is None or current["metadata"]["uid"] != uid

    wait_for("the deleted pod to disappear", gone, node_agent)
    assert (workdir / "sigterm").read_text() == "SIGTERM"
    assert "got SIGTERM" in node_agent.logs(namespace, name)


# ---- (2) an Indexed Job runs to completion and each pod sees its completion index ----------------------------------
def test_indexed_job_completes_and_pods_see_their_index(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api, batch: client.BatchV1Api
) -> None:
    command = script("""
        import os
        print("rank", os.environ["RANK"], "index", os.environ["JOB_COMPLETION_INDEX"], "host", os.environ["HOSTNAME"])
    """)
    batch.create_namespaced_job(namespace, indexed_job("idx", command))
    job = wait_for("Job idx to complete", lambda: job_condition(batch, namespace, "idx", "Complete"), node_agent)
    assert job["status"]["succeeded"] == 2
    assert not job["status"].get("failed")
    pods = job_pods(core, namespace, "idx")
    assert sorted(completion_index(p) for p in pods) == ["0", "1"]
    for pod in pods:
        index = completion_index(pod)
        assert pod["status"]["phase"] == "Succeeded"
        terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (terminated["exitCode"], terminated["reason"]) == (0, "Completed")
        logs = node_agent.logs(namespace, pod["metadata"]["name"])
        assert logs == f"rank {index} index {index} host idx-{index}\n"


# ---- (3) eviction: DisruptionTarget, the pod is replaced, the failure is ignored ------------------------------------
WAIT_FOR_GO = """
    import os, pathlib, signal, sys, time
    signal.signal(signal.SIGTERM, lambda *a: (print("SIGTERM", flush=True), sys.exit(12)))
    print("rank", os.environ["RANK"], "waiting", flush=True)
    go = pathlib.Path(os.environ["GO_FILE"])
    while not go.exists():
        time.sleep(0.1)
    print("rank", os.environ["RANK"], "done", flush=True)
"""


def test_evicted_job_pod_is_replaced_and_the_job_completes_without_failures(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api, batch: client.BatchV1Api, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    recorder = PodRecorder(core, namespace)
    try:
        env = [{"name": "GO_FILE", "value": str(go)}]
        batch.create_namespaced_job(namespace, indexed_job("evict", script(WAIT_FOR_GO), env=env))

        def running_rank1() -> dict[str, Any] | None:
            for pod in job_pods(core, namespace, "evict"):
                logs_ready = pod["status"].get("phase") == "Running"
                if completion_index(pod) == "1" and logs_ready and "waiting" in _logs(node_agent, pod):
                    return pod
            return None

        victim = wait_for("rank 1 to run", running_rank1, node_agent)
        name, uid = victim["metadata"]["name"], victim["metadata"]["uid"]
        eviction = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": namespace}}
        core.create_namespaced_pod_eviction(name, namespace, eviction)

        def replacement() -> dict[str, Any] | None:
            for pod in job_pods(core, namespace, "evict"):
                new = completion_index(pod) == "1" and pod["metadata"]["uid"] != uid
                if new and pod["status"].get("phase") == "Running" and "waiting" in _logs(node_agent, pod):
                    return pod
            return None

        wait_for("a replacement for rank 1", replacement, node_agent)
        go.write_text("go")
        job = wait_for(
            "Job evict to complete", lambda: job_condition(batch, namespace, "evict", "Complete"), node_agent
        )
        assert job["status"]["succeeded"] == 2
        assert not job["status"].get("failed"), "an ignored (DisruptionTarget) failure must not count"

        failed = _failed_state(recorder, uid)
        phases = [s["status"].get("phase") for s in recorder.states(uid)]
        assert failed is not None, f"the evicted pod was never reported Failed: {phases}"
        disruption = condition(failed, "DisruptionTarget")
        assert disruption is not None
        assert (disruption["status"], disruption["reason"]) == ("True", "EvictionByEvictionAPI")
        terminated = failed["status"]["containerStatuses"][0]["state"]["terminated"]
        assert terminated["exitCode"] == 12  # the process handled SIGTERM
    finally:
        recorder.stop()


def _logs(agent: NodeAgent, pod: dict[str, Any]) -> str:
    try:
        return agent.logs(pod["metadata"]["namespace"], pod["metadata"]["name"])
    except FileNotFoundError:
        return ""


# ---- (4) exit code 10 fails the Job at once (podFailurePolicy FailJob) --------------------------------------------
def test_exit_code_10_fails_the_job_at_once(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api, batch: client.BatchV1Api, tmp_path: Path
) -> None:
    command = script("""
        import os, pathlib, sys, time
        if os.environ["RANK"] == "0":
            sys.exit(10)
        while True:
            time.sleep(0.1)
    """)
    batch.create_namespaced_job(namespace, indexed_job("bad", command))
    job = wait_for("Job bad to fail", lambda: job_condition(batch, namespace, "bad", "Failed"), node_agent)
    assert condition(job, "Failed")["reason"] == "PodFailurePolicy"  # type: ignore[index]
    rank0 = [p for p in job_pods(core, namespace, "bad") if completion_index(p) == "0"]
    assert len(rank0) == 1, "FailJob must not retry the rank"
    terminated = rank0[0]["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["reason"]) == (10, "Error")
    # The Job controller deletes the still-running rank 1; the agent terminates it and the pod goes away.
    wait_for(
        "rank 1 to be gone",
        lambda: all(completion_index(p) == "0" for p in job_pods(core, namespace, "bad")),
        node_agent,
    )


# ---- (5) env resolution and termination messages end to end -------------------------------------------------------
REPORT_ENV = """
    import json, os
    keys = ["FROM_CM", "FROM_SECRET", "POD_IP", "INDEX", "NODE", "POD_NAME", "CFG_mode", "COMBINED", "OPTIONAL"]
    keys += ["CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "HOSTNAME"]
    report = {k: os.environ.get(k) for k in keys}
    report["argv"] = os.environ["ARGS_SEEN"]
    with open(os.environ["TERMINATION_MESSAGE_PATH"], "w") as f:
        json.dump(report, f)
"""


def test_env_resolution_and_termination_messages(namespace: str, node_agent: NodeAgent, core: client.CoreV1Api) -> None:
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "cfg"}, "data": {"greeting": "hello", "mode": "fast"}}
    )
    core.create_namespaced_secret(namespace, {"metadata": {"name": "creds"}, "stringData": {"token": "s3cr3t"}})
    env = [
        {"name": "FROM_CM", "valueFrom": {"configMapKeyRef": {"name": "cfg", "key": "greeting"}}},
        {"name": "FROM_SECRET", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {
            "name": "INDEX",
            "valueFrom": {
                "fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}
            },
        },
        {"name": "COMBINED", "value": "$(FROM_CM)-$(INDEX)-$$(FROM_CM)"},
        {"name": "OPTIONAL", "valueFrom": {"configMapKeyRef": {"name": "missing", "key": "k", "optional": True}}},
    ]
    pod = {
        "metadata": {"name": "envs", "annotations": {"batch.kubernetes.io/job-completion-index": "3"}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "report",
                    "image": "t:1",
                    "command": ["sh", "-c", 'ARGS_SEEN="$0 $1" exec "$1" -c "$2"', "$(FROM_CM)", PYTHON],
                    "args": [textwrap.dedent(REPORT_ENV)],
                    "env": env,
                    "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
                },
                {
                    "name": "crash",
                    "image": "t:1",
                    "command": script("import sys; print('boom: bad input', flush=True); sys.exit(3)"),
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                },
            ],
        },
    }
    core.create_namespaced_pod(namespace, pod)

    done = wait_for(
        "pod envs to finish", lambda: pod_in_phase(core, namespace, "envs", "Succeeded", "Failed"), node_agent
    )
    assert done["status"]["phase"] == "Failed"  # one container failed, restartPolicy Never
    statuses = {s["name"]: s["state"]["terminated"] for s in done["status"]["containerStatuses"]}
    assert (statuses["report"]["exitCode"], statuses["report"]["reason"]) == (0, "Completed")
    report = json.loads(statuses["report"]["message"])
    assert report == {
        "FROM_CM": "hello",
        "FROM_SECRET": "s3cr3t",
        "POD_IP": done["status"]["podIP"],
        "INDEX": "3",
        "NODE": done["spec"]["nodeName"],
        "POD_NAME": "envs",
        "CFG_mode": "fast",
        "COMBINED": "hello-3-$(FROM_CM)",
        "OPTIONAL": None,
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
        "HOSTNAME": "envs",
        "argv": f"hello {PYTHON}",
    }
    assert (statuses["crash"]["exitCode"], statuses["crash"]["reason"]) == (3, "Error")
    assert statuses["crash"]["message"] == "boom: bad input\n"


def test_missing_config_map_blocks_the_container_until_it_exists(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    container = {
        "name": "main",
        "image": "t:1",
        "command": script("import os; print(os.environ['LATE'])"),
        "env": [{"name": "LATE", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "v"}}}],
    }
    core.create_namespaced_pod(
        namespace, {"metadata": {"name": "late"}, "spec": {"restartPolicy": "Never", "containers": [container]}}
    )

    def config_error() -> bool:
        current = get_pod(core, namespace, "late")
        statuses = (current or {}).get("status", {}).get("containerStatuses") or [{}]
        return bool(statuses[0].get("state", {}).get("waiting", {}).get("reason") == "CreateContainerConfigError")

    wait_for("CreateContainerConfigError", config_error, node_agent)
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "late"}, "data": {"v": "arrived"}})
    wait_for(
        "the pod to succeed",
        lambda: pod_in_phase(core, namespace, "late", "Succeeded"),
        node_agent,
    )
    assert node_agent.logs(namespace, "late") == "arrived\n"


# ---- (6) init containers and restartPolicy OnFailure ---------------------------------------------------------------
def test_init_containers_run_in_order_and_on_failure_restarts(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    first = script("import pathlib; pathlib.Path('order').write_text('first\\n')")
    flaky = script("""
        import pathlib, sys
        marker = pathlib.Path("init-tried")
        if not marker.exists():
            marker.write_text("x")
            sys.exit(1)
        with open("order", "a") as f:
            f.write("second\\n")
    """)
    main = script("""
        import pathlib, sys
        marker = pathlib.Path("main-tried")
        if not marker.exists():
            marker.write_text("x")
            print("first run fails", flush=True)
            sys.exit(2)
        print(pathlib.Path("order").read_text(), end="", flush=True)
    """)
    pod = {
        "metadata": {"name": "inits"},
        "spec": {
            "restartPolicy": "OnFailure",
            "initContainers": [
                {"name": "first", "image": "t:1", "command": first},
                {"name": "flaky", "image": "t:1", "command": flaky},
            ],
            "containers": [{"name": "main", "image": "t:1", "command": main}],
        },
    }
    core.create_namespaced_pod(namespace, pod)
    done = wait_for(
        "pod inits to succeed",
        lambda: pod_in_phase(core, namespace, "inits", "Succeeded"),
        node_agent,
    )
    init_statuses = done["status"]["initContainerStatuses"]
    assert [s["name"] for s in init_statuses] == ["first", "flaky"]
    assert [s["restartCount"] for s in init_statuses] == [0, 1]
    assert init_statuses[1]["lastState"]["terminated"]["exitCode"] == 1
    main_status = done["status"]["containerStatuses"][0]
    assert main_status["restartCount"] == 1
    assert main_status["lastState"]["terminated"]["exitCode"] == 2
    assert main_status["state"]["terminated"]["exitCode"] == 0
    assert node_agent.logs(namespace, "inits") == "first\nsecond\n"
    assert node_agent.logs(namespace, "inits", previous=True) == "first run fails\n"
    assert condition(done, "Initialized")["status"] == "True"  # type: ignore[index]


def test_failing_init_container_fails_a_never_restart_pod(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    pod = {
        "metadata": {"name": "badinit"},
        "spec": {
            "restartPolicy": "Never",
            "initContainers": [{"name": "check", "image": "t:1", "command": script("import sys; sys.exit(4)")}],
            "containers": [{"name": "main", "image": "t:1", "command": script("open('ran', 'w')")}],
        },
    }
    core.create_namespaced_pod(namespace, pod)
    done = wait_for(
        "pod badinit to fail",
        lambda: pod_in_phase(core, namespace, "badinit", "Failed"),
        node_agent,
    )
    assert done["status"]["initContainerStatuses"][0]["state"]["terminated"]["exitCode"] == 4
    assert "running" not in done["status"]["containerStatuses"][0]["state"]
    assert not (node_agent.workdir(namespace, "badinit") / "ran").exists()
    assert condition(done, "Initialized")["status"] == "False"  # type: ignore[index]


# ---- (7) pods reach each other by <hostname>.<subdomain>, resolved within their own namespace -----------------------
PEER = """
    import http.server, os, sys, threading, time, urllib.request
    served = threading.Event()
    me = f"{os.environ['HOSTNAME']}@{os.environ['NAMESPACE']}"

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(me.encode())
            served.set()

        def log_message(self, *args):  # no access log: it would interleave with the lines checked below
            pass

    server = http.server.HTTPServer((os.environ["POD_IP"], 8080), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("serving", flush=True)
    deadline = time.monotonic() + 60
    for name in sys.argv[1:]:
        while True:
            try:
                with urllib.request.urlopen(f"http://{name}:8080/", timeout=2) as response:
                    print(f"{name} -> {response.read().decode()}", flush=True)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    sys.exit(f"cannot reach {name}: {exc}")
                time.sleep(0.2)
    if not served.wait(600 if len(sys.argv) == 1 else 60):
        sys.exit("nobody reached me")
    time.sleep(0.5)  # let the peer finish reading the response before the server goes away
"""


def peer_pod(name: str, namespace: str, *targets: str) -> dict[str, Any]:
    env = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    return {
        "metadata": {"name": name, "namespace": namespace, "labels": {"group": "grp"}},
        "spec": {
            "restartPolicy": "Never",
            "hostname": name,
            "subdomain": "grp",
            "containers": [{"name": "peer", "image": "t:1", "command": [*script(PEER), *targets], "env": env}],
        },
    }


def test_pods_reach_each_other_by_hostname_and_subdomain(
    cluster: Any, namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    # Another namespace has a pod with the same hostname and subdomain, started first (so in the machine-wide
    # /etc/hosts its line comes first): pods must still resolve the short name to their own namespace's pod.
    other = cluster.create_namespace("impostor")
    try:
        core.create_namespaced_pod(other, peer_pod("beta", other))
        wait_for("the impostor to serve", lambda: "serving" in node_agent.logs(other, "beta"), node_agent)
        for ns in (namespace, other):
            service = {"metadata": {"name": "grp"}, "spec": {"clusterIP": "None", "selector": {"group": "grp"}}}
            core.create_namespaced_service(ns, service)
        other_fqdn = f"beta.grp.{other}.svc.cluster.local"
        core.create_namespaced_pod(
            namespace, peer_pod("alpha", namespace, "beta.grp", f"beta.grp.{namespace}.svc.cluster.local", other_fqdn)
        )
        core.create_namespaced_pod(namespace, peer_pod("beta", namespace, "alpha.grp", f"alpha.grp.{namespace}"))

        def both_done() -> bool:
            phases = [(get_pod(core, namespace, n) or {}).get("status", {}).get("phase") for n in ("alpha", "beta")]
            if "Failed" in phases:
                logs = {n: node_agent.logs(namespace, n) for n in ("alpha", "beta")}
                pytest.fail(f"a peer failed: {logs}")
            return phases == ["Succeeded", "Succeeded"]

        wait_for("both peers to reach each other", both_done, node_agent)
        assert node_agent.logs(namespace, "alpha").splitlines() == [
            "serving",
            f"beta.grp -> beta@{namespace}",
            f"beta.grp.{namespace}.svc.cluster.local -> beta@{namespace}",
            f"{other_fqdn} -> beta@{other}",
        ]
        assert node_agent.logs(namespace, "beta").splitlines() == [
            "serving",
            f"alpha.grp -> alpha@{namespace}",
            f"alpha.grp.{namespace} -> alpha@{namespace}",
        ]
    finally:
        cluster.delete_namespace(other)


# ---- (8) node loss and agent shutdown: graceful termination, DisruptionTarget, clean-up ------------------------------
SLEEPER = """
    import pathlib, signal, sys, time
    def on_term(signum, frame):
        print("terminating", flush=True)
        sys.exit(12)
    signal.signal(signal.SIGTERM, on_term)
    print("started", flush=True)
    while True:
        time.sleep(0.1)
"""


def test_node_loss_and_agent_stop_terminate_pods_and_clean_up(
    cluster: Any, namespace: str, core: client.CoreV1Api, tmp_path: Path
) -> None:
    nodes = ["spare-node-0", "spare-node-1"]
    config = AgentConfig(
        kubeconfig=str(cluster.kubeconfig),
        state_dir=str(tmp_path / "state"),
        nodes=nodes,
        heartbeat_seconds=1.0,
        taints=[{"key": "dbo.test/spare", "effect": "NoSchedule"}],  # keep other tests' pods off these nodes
        parent_pid=os.getpid(),
    )
    agent = NodeAgent(config, tmp_path / "agent.log").start()
    recorder = PodRecorder(core, namespace)
    follow: subprocess.Popen[str] | None = None
    try:
        agent_id = agent.info["agentId"]
        assert f"BEGIN dreambooth-operator test node agent {agent_id}" in Path("/etc/hosts").read_text()
        uids = {}
        for i, node in enumerate(nodes):
            pod = {
                "metadata": {"name": f"p{i}"},
                "spec": {
                    "restartPolicy": "Never",
                    "hostname": f"p{i}",
                    "subdomain": "spare",
                    "nodeSelector": {"kubernetes.io/hostname": node},
                    "tolerations": [{"key": "dbo.test/spare", "operator": "Exists"}],
                    "terminationGracePeriodSeconds": 30,
                    "containers": [{"name": "main", "image": "t:1", "command": script(SLEEPER)}],
                },
            }
            uids[f"p{i}"] = core.create_namespaced_pod(namespace, pod).metadata.uid

        def started(name: str) -> Callable[[], bool]:
            return lambda: "started" in _logs(agent, {"metadata": {"namespace": namespace, "name": name}})

        for name in uids:
            wait_for(f"{name} to start", started(name), agent)
        p0 = get_pod(core, namespace, "p0")
        assert p0 is not None
        assert f"{p0['status']['podIP']}\tp0.spare p0.spare.{namespace}" in Path("/etc/hosts").read_text()
        follow = subprocess.Popen(
            [str(cluster_kubectl_path()), f"--kubeconfig={cluster.kubeconfig}", "logs", "-f", "-n", namespace, "p0"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

        # Losing a node (its Node object deleted) shuts its pods down like a node shutdown.
        client.CoreV1Api(core.api_client).delete_node("spare-node-1")
        lost = wait_for("p1 to be failed by the node loss", lambda: _failed_state(recorder, uids["p1"]), agent)
        assert condition(lost, "DisruptionTarget")["reason"] == "TerminationByKubelet"  # type: ignore[index]
        assert lost["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 12
        assert (get_pod(core, namespace, "p0") or {})["status"]["phase"] == "Running"
    finally:
        agent.stop()
    try:  # (the agent is stopped: nothing to check it for)
        wait_until(
            lambda: _failed_state(recorder, uids["p0"]) is not None,
            what="the agent stop to report p0 Failed",
            timeout=30,
            interval=0.1,
        )
    finally:
        recorder.stop()
    stopped = _failed_state(recorder, uids["p0"])
    assert stopped is not None, "the agent stop did not report p0 Failed"
    assert condition(stopped, "DisruptionTarget")["reason"] == "TerminationByKubelet"  # type: ignore[index]
    assert stopped["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 12
    assert agent_id not in Path("/etc/hosts").read_text()
    for node in nodes:
        with pytest.raises(client.ApiException) as missing:
            core.read_node(node)
        assert missing.value.status == 404
    assert follow is not None
    out, _ = follow.communicate(timeout=30)
    assert out.splitlines() == ["started", "terminating"]


def _failed_state(recorder: PodRecorder, uid: str) -> dict[str, Any] | None:
    failed = [s for s in recorder.states(uid) if s["status"].get("phase") == "Failed"]
    return failed[-1] if failed else None


def cluster_kubectl_path() -> Path:
    return TOOLS_BIN / "kubectl"


# ---- (9) restartPolicy Always with back-off, and a liveness probe restarting a container -------------------------
def test_always_restarts_crashing_containers_and_liveness_failures(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    crasher = {"name": "crasher", "image": "t:1", "command": script("import sys; print('crash'); sys.exit(1)")}
    unhealthy_once = script("""
        import pathlib, signal, sys, time
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
        first = not pathlib.Path("ran-before").exists()
        pathlib.Path("ran-before").write_text("x")
        pathlib.Path("healthy").write_text("no" if first else "yes")
        while True:
            time.sleep(0.1)
    """)
    probed = {
        "name": "probed",
        "image": "t:1",
        "command": unhealthy_once,
        "livenessProbe": {
            "exec": {"command": [PYTHON, "-c", "import sys; sys.exit(open('healthy').read() != 'yes')"]},
            "periodSeconds": 1,
            "failureThreshold": 2,
        },
    }
    pod = {
        "metadata": {"name": "restarts"},
        "spec": {"restartPolicy": "Always", "terminationGracePeriodSeconds": 5, "containers": [crasher, probed]},
    }
    core.create_namespaced_pod(namespace, pod)

    def restarted() -> dict[str, Any] | None:
        current = get_pod(core, namespace, "restarts") or {}
        statuses = {s["name"]: s for s in current.get("status", {}).get("containerStatuses") or []}
        crashes = statuses.get("crasher", {}).get("restartCount", 0)
        probe_restarts = statuses.get("probed", {}).get("restartCount", 0)
        return current if crashes >= 2 and probe_restarts == 1 and "running" in statuses["probed"]["state"] else None

    current = wait_for("crash loops and a liveness restart", restarted, node_agent)
    assert current["status"]["phase"] == "Running"
    statuses = {s["name"]: s for s in current["status"]["containerStatuses"]}
    assert statuses["crasher"]["lastState"]["terminated"]["exitCode"] == 1
    assert statuses["probed"]["lastState"]["terminated"]["exitCode"] == 0  # SIGTERM handled by the process
    assert node_agent.logs(namespace, "restarts", "crasher", previous=True) == "crash\n"


# ---- (10) an agent crash: its processes die with it, and the next agent reports the pods it finds as lost ---------
def test_pods_of_a_crashed_agent_are_reported_lost_by_the_next_agent(
    cluster: Any, namespace: str, core: client.CoreV1Api, tmp_path: Path
) -> None:
    def make_agent(tag: str) -> NodeAgent:
        config = AgentConfig(
            kubeconfig=str(cluster.kubeconfig),
            state_dir=str(tmp_path / tag),
            nodes=["crash-node-0"],
            taints=[{"key": "dbo.test/spare", "effect": "NoSchedule"}],
            parent_pid=os.getpid(),
        )
        return NodeAgent(config, tmp_path / f"{tag}.log").start()

    first = make_agent("first")
    second: NodeAgent | None = None
    try:
        pod = {
            "metadata": {"name": "orphan"},
            "spec": {
                "restartPolicy": "Never",
                "hostname": "orphan",
                "subdomain": "crash",
                "nodeSelector": {"kubernetes.io/hostname": "crash-node-0"},
                "tolerations": [{"key": "dbo.test/spare", "operator": "Exists"}],
                "containers": [
                    {
                        "name": "main",
                        "image": "t:1",
                        "command": script("""
                            import os, pathlib, time
                            pathlib.Path("pid").write_text(str(os.getpid()))
                            while True:
                                time.sleep(0.1)
                        """),
                    }
                ],
            },
        }
        core.create_namespaced_pod(namespace, pod)
        pid_file = wait_for(
            "the pod to write its pid",
            lambda: (f := first.workdir(namespace, "orphan") / "pid").exists() and f.read_text() and f,
            first,
        )
        pid = int(pid_file.read_text())
        first.kill()
        assert wait_process_exit(pid, 10), "the pod process outlived its agent"

        second = make_agent("second")
        # A crash cannot clean up; the next agent that writes the file drops the dead agent's block.
        assert first.info["agentId"] not in Path("/etc/hosts").read_text()
        lost = wait_for(
            "the lost pod to be failed",
            lambda: pod_in_phase(core, namespace, "orphan", "Failed"),
            second,
        )
        assert lost["status"]["reason"] == "NodeAgentRestarted"
        assert lost["status"]["containerStatuses"][0]["state"]["terminated"]["reason"] == "ContainerStatusUnknown"
    finally:
        first.stop()
        if second is not None:
            second.stop()


# ---- (11) the trainer's rendezvous: torch.distributed (gloo) across the pods of an Indexed Job ---------------------
ALL_REDUCE = """
    import datetime, os
    import torch
    import torch.distributed as dist
    rank = int(os.environ["RANK"])
    dist.init_process_group(
        "gloo", init_method="env://", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120)
    )
    value = torch.tensor([float(rank + 1)])
    dist.all_reduce(value)
    print("master", os.environ["MASTER_ADDR"], "sum", value.item(), flush=True)
    dist.destroy_process_group()
"""


def test_indexed_job_ranks_rendezvous_through_the_rank0_hostname(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api, batch: client.BatchV1Api
) -> None:
    core.create_namespaced_service(
        namespace, {"metadata": {"name": "ddp"}, "spec": {"clusterIP": "None", "selector": {"job-name": "ddp"}}}
    )
    with socket.socket() as probe:  # a port no other session's store holds right now (stores bind 0.0.0.0)
        probe.bind(("0.0.0.0", 0))  # noqa: S104 (checking exactly what the store will bind)
        port = probe.getsockname()[1]
    env = [
        {"name": "MASTER_ADDR", "value": "ddp-0.ddp"},
        {"name": "MASTER_PORT", "value": str(port)},
    ]
    batch.create_namespaced_job(namespace, indexed_job("ddp", script(ALL_REDUCE), env=env))
    wait_for("Job ddp to complete", lambda: job_condition(batch, namespace, "ddp", "Complete"), node_agent, 240)
    for pod in job_pods(core, namespace, "ddp"):
        assert "master ddp-0.ddp sum 3.0" in node_agent.logs(namespace, pod["metadata"]["name"])


# ---- (12) a process that ignores SIGTERM is killed when the grace period ends ------------------------------------
def test_sigkill_after_the_grace_period(namespace: str, node_agent: NodeAgent, core: client.CoreV1Api) -> None:
    stubborn = script("""
        import signal, time
        signal.signal(signal.SIGTERM, lambda *a: print("ignoring SIGTERM", flush=True))
        print("up", flush=True)
        while True:
            time.sleep(0.1)
    """)
    pod = {
        "metadata": {"name": "stubborn"},
        "spec": {
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": "t:1", "command": stubborn}],
        },
    }
    uid = core.create_namespaced_pod(namespace, pod).metadata.uid
    wait_for("the pod to start", lambda: "up" in node_agent.logs(namespace, "stubborn"), node_agent)
    recorder = PodRecorder(core, namespace)
    try:
        started = time.monotonic()
        core.delete_namespaced_pod("stubborn", namespace, grace_period_seconds=2)
        final = wait_for("the pod to be killed", lambda: _failed_state(recorder, uid), node_agent)
        elapsed = time.monotonic() - started
    finally:
        recorder.stop()
    terminated = final["status"]["containerStatuses"][0]["state"]["terminated"]
    assert (terminated["exitCode"], terminated["signal"]) == (137, 9)
    assert 2.0 <= elapsed < 20.0, f"killed after {elapsed:.1f}s, not after the 2s grace period"
    assert "ignoring SIGTERM" in node_agent.logs(namespace, "stubborn")
    wait_for("the pod to disappear", lambda: get_pod(core, namespace, "stubborn") is None, node_agent)
