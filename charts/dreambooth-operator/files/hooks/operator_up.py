"""`helm test`: every Ready operator pod answers on /healthz and /metrics, and dreambooth.dev is served.

Run by the chart's test hook (templates/tests/operator-up.yaml) in the operator image, as a ServiceAccount that may
only list the pods of the release's namespace. It finds the operator's pods by the Deployment's selector and reads
kopf's /healthz and the operator's /metrics from each pod's IP (as Prometheus's pod discovery would; the test pod
runs beside them in the release's namespace), then the discovery of dreambooth.dev. Exit 0 when all answer, 1 with
the reason otherwise.
"""

from __future__ import annotations

import os
import sys
import urllib.request

from kubernetes import client, config

RESOURCES = {"dreamboothjobs", "inferenceservices"}


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as answer:  # noqa: S310 (http to a pod IP the API server gave)
        return str(answer.read().decode())


def ready(pod: client.V1Pod) -> bool:
    conditions = pod.status.conditions or []
    return bool(pod.status.pod_ip) and any(c.type == "Ready" and c.status == "True" for c in conditions)


def main() -> int:
    config.load_incluster_config()
    api = client.ApiClient()
    env = os.environ
    pods = client.CoreV1Api(api).list_namespaced_pod(env["RELEASE_NAMESPACE"], label_selector=env["POD_SELECTOR"])
    up = [p for p in pods.items if ready(p)]
    if not up:
        print(f"FAIL: no Ready operator pod ({env['POD_SELECTOR']})", file=sys.stderr)
        return 1
    for pod in up:
        host = f"[{pod.status.pod_ip}]" if ":" in pod.status.pod_ip else pod.status.pod_ip
        try:
            health = get(f"http://{host}:{env['HEALTH_PORT']}/healthz")
            metrics = get(f"http://{host}:{env['METRICS_PORT']}/metrics")
        except OSError as err:
            print(f"FAIL: operator pod {pod.metadata.name} ({host}): {err}", file=sys.stderr)
            return 1
        if "dreambooth_operator_" not in metrics:
            print(f"FAIL: {pod.metadata.name}: /metrics has no dreambooth_operator_ series", file=sys.stderr)
            return 1
        print(f"ok: operator pod {pod.metadata.name}: /healthz {health.strip()!r}, /metrics answered")
    served = client.CustomObjectsApi(api).get_api_resources("dreambooth.dev", env["API_VERSION"])
    names = {r.name for r in served.resources}
    if not names >= RESOURCES:
        print(f"FAIL: dreambooth.dev serves {sorted(names)}, not {sorted(RESOURCES)}", file=sys.stderr)
        return 1
    print(f"ok: dreambooth.dev/{env['API_VERSION']} serves {sorted(RESOURCES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
