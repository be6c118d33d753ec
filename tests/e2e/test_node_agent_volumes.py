"""The test node agent's configMap and secret volumes follow their objects, as the kubelet's do.

A running pod prints the content of its mounted files whenever it changes; the test changes the objects through
the API and waits for the pod to print the new content (no restart: the same container run). On the agent's side
the folder has the kubelet's atomic-writer layout, so a program that re-reads a path always finds the newest file.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.e2e.test_node_agent import PYTHON, get_pod, wait_for
from tests.nodeagent.plugin import NodeAgent

MOUNT = "/etc/dreambooth-test/volumes"
WATCHER = f"""
import pathlib, time
paths = [pathlib.Path("{MOUNT}", name) for name in ("config/greeting", "later/note", "secret/key")]
seen = {{}}
while True:
    for path in paths:
        text = path.read_text() if path.exists() else None
        if seen.get(path, "") != text:
            seen[path] = text
            print(f"{{path.parent.name}}: {{text}}", flush=True)
    time.sleep(0.05)
"""


@pytest.fixture
def core(cluster: Any) -> Iterator[client.CoreV1Api]:
    api = cluster.api_client()
    yield client.CoreV1Api(api)
    api.close()


def test_config_map_and_secret_volumes_follow_their_objects_in_a_running_pod(
    namespace: str, node_agent: NodeAgent, core: client.CoreV1Api
) -> None:
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "greeting"}, "data": {"greeting": "hello"}})
    core.create_namespaced_secret(namespace, {"metadata": {"name": "key"}, "stringData": {"key": "one"}})
    volumes = [
        {"name": "config", "configMap": {"name": "greeting"}},
        {"name": "later", "configMap": {"name": "later", "optional": True}},  # created while the pod runs
        {"name": "secret", "secret": {"secretName": "key", "defaultMode": 0o400}},
    ]
    container = {
        "name": "watch",
        "image": "t:1",
        "command": [PYTHON, "-c", textwrap.dedent(WATCHER)],
        "volumeMounts": [{"name": v["name"], "mountPath": f"{MOUNT}/{v['name']}"} for v in volumes],
    }
    pod = {"metadata": {"name": "watcher"}, "spec": {"containers": [container], "volumes": volumes}}
    core.create_namespaced_pod(namespace, pod)

    def printed(*lines: str) -> bool:
        logs = node_agent.logs(namespace, "watcher").splitlines()
        return all(line in logs for line in lines)

    wait_for("the first content", lambda: printed("config: hello", "later: None", "secret: one"), node_agent)
    core.patch_namespaced_config_map("greeting", namespace, {"data": {"greeting": "bonjour"}})
    core.create_namespaced_config_map(namespace, {"metadata": {"name": "later"}, "data": {"note": "arrived"}})
    core.patch_namespaced_secret("key", namespace, {"stringData": {"key": "two"}})
    wait_for("the new content", lambda: printed("config: bonjour", "later: arrived", "secret: two"), node_agent)

    running = get_pod(core, namespace, "watcher")
    assert running is not None
    assert running["status"]["containerStatuses"][0]["restartCount"] == 0  # the same process saw every change
    # The kubelet's layout: key -> ..data/key, ..data -> the one timestamped folder left.
    folder = node_agent.pod_dir(namespace, "watcher") / "volumes" / "config"
    assert (folder / "greeting").readlink() == Path("..data/greeting")
    stamped = sorted(p.name for p in folder.iterdir() if p.name.startswith("..") and not p.is_symlink())
    assert len(stamped) == 1
    assert (folder / "..data").readlink() == Path(stamped[0])
    assert (folder / "greeting").read_text() == "bonjour"
    secret_file = node_agent.pod_dir(namespace, "watcher") / "volumes" / "secret" / "key"
    assert secret_file.stat().st_mode & 0o777 == 0o400
