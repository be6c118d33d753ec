"""`helm uninstall`'s pre-delete hook: stop the operator, then take its finalizer off the resources it watched.

kopf puts the operator's finalizer on every DreamBoothJob and InferenceService (so that its daemons stop before the
object goes). Once the chart's Deployment is gone nothing would remove it, and such a resource (and its namespace)
could never be deleted. Run by templates/uninstall-hook.yaml in the operator image, before Helm deletes anything:

1. scale the operator's Deployment to 0 and wait until its pods are gone (a running operator would put the
   finalizer back at the next event);
2. remove that one finalizer from the DreamBoothJobs and InferenceServices of the watched namespaces (every
   namespace when the release watches the whole cluster), with a merge patch conditional on the resourceVersion
   read (a conflict fails the hook rather than drop a finalizer added meanwhile).

Nothing is deleted: the resources, their children, and every object in object storage stay as they are; other
finalizers stay too. Settings come from the environment the template sets.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

GROUP, PLURALS = "dreambooth.dev", ("dreamboothjobs", "inferenceservices")
STOP_TIMEOUT_S = float(os.environ.get("STOP_TIMEOUT_SECONDS", "300"))


def stop_operator(apps: client.AppsV1Api, core: client.CoreV1Api, namespace: str, name: str, selector: str) -> None:
    try:
        apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": 0}})
    except ApiException as err:
        if err.status != 404:  # no Deployment: nothing runs, go on with the finalizers
            raise
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while pods := core.list_namespaced_pod(namespace, label_selector=selector).items:
        if time.monotonic() > deadline:
            left = [p.metadata.name for p in pods]
            raise TimeoutError(f"operator pods still there after {STOP_TIMEOUT_S:.0f} s: {left}")
        time.sleep(1)
    print(f"operator {namespace}/{name} stopped")


def release(objects: client.CustomObjectsApi, version: str, namespaces: list[str], finalizer: str) -> int:
    released = 0
    for plural in PLURALS:
        found: list[dict[str, Any]] = []
        if namespaces:
            for ns in namespaces:
                found += objects.list_namespaced_custom_object(GROUP, version, ns, plural)["items"]
        else:
            found = objects.list_cluster_custom_object(GROUP, version, plural)["items"]
        for obj in found:
            meta = obj["metadata"]
            finalizers = meta.get("finalizers") or []
            if finalizer not in finalizers:
                continue
            rest = [f for f in finalizers if f != finalizer]
            patch = {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}}
            objects.patch_namespaced_custom_object(GROUP, version, meta["namespace"], plural, meta["name"], patch)
            print(f"{plural}/{meta['name']} in {meta['namespace']}: finalizer {finalizer} removed")
            released += 1
    return released


def main() -> int:
    config.load_incluster_config()
    api = client.ApiClient()
    env = os.environ
    namespace = env["RELEASE_NAMESPACE"]
    stop_operator(client.AppsV1Api(api), client.CoreV1Api(api), namespace, env["DEPLOYMENT"], env["POD_SELECTOR"])
    watched: list[str] = json.loads(env["WATCH_NAMESPACES"])
    count = release(client.CustomObjectsApi(api), env["API_VERSION"], watched, env["FINALIZER"])
    print(f"{count} resources released; nothing deleted")
    return 0


if __name__ == "__main__":
    sys.exit(main())
