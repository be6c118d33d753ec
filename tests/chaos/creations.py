"""Every pod and batch Job a namespace ever held, by uid: a list + watch per kind in a thread, listed again after
any error (an API server that is down, a watch that expired), so a creation is seen even across an outage.

    with Creations(cluster, namespace) as seen:
        ...
    assert seen.duplicates("jobs") == {}

An object deleted and created again under its name shows as two uids for one name: a duplicate.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from kubernetes import client, watch

from tests.infra.controlplane import Cluster

WATCH_SECONDS = 5  # a watch ends this often, so that `close()` is quick
RETRY_SECONDS = 0.5  # between two tries while the API server does not answer


class Creations:
    """The uids of the pods and batch Jobs seen in one namespace, by kind and name, and their labels."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.namespace = namespace
        self._api = cluster.api_client()
        core, batch = client.CoreV1Api(self._api), client.BatchV1Api(self._api)
        self._lists: dict[str, Callable[..., Any]] = {
            "pods": core.list_namespaced_pod,
            "jobs": batch.list_namespaced_job,
        }
        self._lock = threading.Lock()
        self._uids: dict[str, dict[str, set[str]]] = {kind: defaultdict(set) for kind in self._lists}
        self.labels: dict[str, dict[str, str]] = {}
        """uid -> the object's labels when first seen."""
        self.errors = 0
        """Lists and watches that failed (and were tried again)."""
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(kind,), daemon=True) for kind in self._lists]

    def __enter__(self) -> Creations:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(WATCH_SECONDS + 10)
        self._api.close()

    def uids(self, kind: str, selector: Callable[[dict[str, str]], bool] = lambda _: True) -> dict[str, set[str]]:
        """name -> the uids seen under it, of the objects whose labels `selector` accepts."""
        with self._lock:
            return {
                name: {u for u in uids if selector(self.labels.get(u, {}))}
                for name, uids in self._uids[kind].items()
                if any(selector(self.labels.get(u, {})) for u in uids)
            }

    def count_by_label(self, kind: str, key: str) -> dict[str, int]:
        """How many objects of `kind` were seen per value of the label `key` (those without it left out)."""
        counts: dict[str, int] = {}
        for uids in self.uids(kind).values():
            for uid in uids:
                value = self.labels.get(uid, {}).get(key)
                if value is not None:
                    counts[value] = counts.get(value, 0) + 1
        return counts

    def duplicates(self, kind: str) -> dict[str, set[str]]:
        """Names that more than one object has had."""
        return {name: uids for name, uids in self.uids(kind).items() if len(uids) > 1}

    def _seen(self, kind: str, obj: Any) -> None:
        meta = obj.metadata
        with self._lock:
            self._uids[kind][meta.name].add(meta.uid)
            self.labels.setdefault(meta.uid, dict(meta.labels or {}))

    def _run(self, kind: str) -> None:
        list_fn = self._lists[kind]
        while not self._stop.is_set():
            try:
                listing = list_fn(self.namespace)
                for obj in listing.items:
                    self._seen(kind, obj)
                version = listing.metadata.resource_version
                while not self._stop.is_set():
                    stream = watch.Watch().stream(
                        list_fn, self.namespace, resource_version=version, timeout_seconds=WATCH_SECONDS
                    )
                    for event in stream:
                        if event["type"] == "ERROR":
                            raise RuntimeError(str(event["raw_object"]))
                        version = event["object"].metadata.resource_version
                        if event["type"] in ("ADDED", "MODIFIED"):
                            self._seen(kind, event["object"])
            except Exception:  # the API server is down, or the watch expired: list again
                self.errors += 1
                self._stop.wait(RETRY_SECONDS)
