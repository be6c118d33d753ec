"""Projected volumes, the one kind of volume the agent gives pods: above all the ServiceAccount token volume.

The ServiceAccount admission plugin adds a ``kube-api-access-*`` volume to every pod whose ServiceAccount token is
automounted: a ``projected`` volume of a ``serviceAccountToken`` (a token bound to the pod), the ``kube-root-ca.crt``
ConfigMap's ``ca.crt`` and the namespace (``downwardAPI``), mounted at ``/var/run/secrets/kubernetes.io/
serviceaccount``. As the kubelet does, the agent asks the TokenRequest API for that token (bound to the pod's name
and uid, so it stops working when the pod is gone), writes the files into the pod's state folder
(``<pod dir>/volumes/<volume>/``), refreshes the token at 80% of its lifetime, and bind-mounts the folder at the
``mountPath`` inside the container's own mount namespace (runtime.py), so a program finds it where in-cluster
configuration looks. With ``KUBERNETES_SERVICE_HOST``/``PORT`` (agent.py: the API server of the agent's kubeconfig,
as kube-proxy would route the ``kubernetes`` Service), ``load_incluster_config()`` works unchanged.

Other volume types (emptyDir, configMap, secret, persistentVolumeClaim, ...) are not mounted: containers of a pod
share its working directory instead (README.md).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .envresolve import EnvResolutionError, ObjectSource, RuntimeFields, field_value
from .kube import Kube

log = logging.getLogger(__name__)

DEFAULT_TOKEN_SECONDS = 3600
REFRESH_FRACTION = 0.8  # the kubelet renews a projected token once 80% of its lifetime has passed


@dataclass(frozen=True)
class Mount:
    """A folder of the agent's to bind-mount at ``target`` inside a container."""

    source: Path
    target: str
    read_only: bool


@dataclass
class _Token:
    volume: str
    path: Path
    account: str
    audience: str | None
    seconds: int
    refresh_at: float = 0.0


@dataclass
class ProjectedVolumes:
    """The projected volumes of one pod, written under ``root`` on first use."""

    kube: Kube
    source: ObjectSource
    root: Path
    written: set[str] = field(default_factory=set)
    tokens: list[_Token] = field(default_factory=list)

    def mounts(self, pod: Mapping[str, Any], container: Mapping[str, Any], runtime: RuntimeFields) -> list[Mount]:
        """The container's mounts of projected volumes (written now if needed); other volume types are skipped.

        Raises EnvResolutionError (the container stays ``CreateContainerConfigError``) when a source is missing."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: list[Mount] = []
        for item in container.get("volumeMounts") or []:
            volume = volumes.get(item["name"]) or {}
            if "projected" not in volume:
                continue
            folder = self.root / item["name"]
            if item["name"] not in self.written:
                self._write(pod, item["name"], volume["projected"], folder, runtime)
                self.written.add(item["name"])
            target = str(item["mountPath"])
            Path(target).mkdir(parents=True, exist_ok=True)  # a mount point must exist (empty on the host)
            mounts.append(Mount(folder, target, bool(item.get("readOnly", False))))
        return mounts

    def refresh(self, pod: Mapping[str, Any]) -> None:
        """Renew the tokens past 80% of their lifetime (in place: running containers see the new file)."""
        now = time.monotonic()
        for token in self.tokens:
            if now >= token.refresh_at:
                self._write_token(pod, token)

    # ---- writing ---------------------------------------------------------------------------------------------
    def _write(
        self, pod: Mapping[str, Any], name: str, projected: Mapping[str, Any], folder: Path, runtime: RuntimeFields
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mode = int(projected.get("defaultMode", 0o644))
        namespace = pod["metadata"]["namespace"]
        for src in projected.get("sources") or []:
            if "serviceAccountToken" in src:
                spec = src["serviceAccountToken"]
                token = _Token(
                    volume=name,
                    path=folder / spec["path"],
                    account=pod["spec"].get("serviceAccountName") or "default",
                    audience=spec.get("audience"),
                    seconds=int(spec.get("expirationSeconds") or DEFAULT_TOKEN_SECONDS),
                )
                self._write_token(pod, token)
                self.tokens.append(token)
            elif "configMap" in src or "secret" in src:
                is_secret = "secret" in src
                ref = src["secret" if is_secret else "configMap"]
                obj = (
                    self.source.secret(namespace, ref["name"])
                    if is_secret
                    else self.source.config_map(namespace, ref["name"])
                )
                if obj is None:
                    if ref.get("optional"):
                        continue
                    kind = "secret" if is_secret else "configmap"
                    raise EnvResolutionError(f'{kind} "{ref["name"]}" not found (projected volume {name})')
                data = _data(obj, secret=is_secret)
                items = ref.get("items") or [{"key": k, "path": k} for k in data]
                for entry in items:
                    if entry["key"] not in data:
                        raise EnvResolutionError(f"couldn't find key {entry['key']} in {ref['name']} (volume {name})")
                    _write_file(folder / entry["path"], data[entry["key"]], int(entry.get("mode", mode)))
            elif "downwardAPI" in src:
                for entry in src["downwardAPI"].get("items") or []:
                    if "fieldRef" not in entry:
                        raise EnvResolutionError(f"volume {name}: only fieldRef items are supported")
                    value = field_value(pod, entry["fieldRef"]["fieldPath"], runtime).encode()
                    _write_file(folder / entry["path"], value, int(entry.get("mode", mode)))
            else:
                raise EnvResolutionError(f"volume {name}: unsupported projected source {sorted(src)}")

    def _write_token(self, pod: Mapping[str, Any], token: _Token) -> None:
        meta = pod["metadata"]
        spec: dict[str, Any] = {
            "expirationSeconds": token.seconds,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if token.audience:
            spec["audiences"] = [token.audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        path = f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{token.account}/token"
        status = self.kube.create(path, body)["status"]
        _write_file(token.path, status["token"].encode(), 0o600)
        expires = datetime.fromisoformat(status["expirationTimestamp"].replace("Z", "+00:00")).timestamp()
        lifetime = max(60.0, expires - time.time())
        token.refresh_at = time.monotonic() + REFRESH_FRACTION * lifetime
        log.info("pod %s/%s: token of ServiceAccount %s written", meta["namespace"], meta["name"], token.account)


def _data(obj: Mapping[str, Any], *, secret: bool) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    encoded = obj.get("data") or {}
    if secret:
        data.update({k: base64.b64decode(v) for k, v in encoded.items()})
    else:
        data.update({k: str(v).encode() for k, v in encoded.items()})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def _write_file(path: Path, content: bytes, mode: int) -> None:
    """Atomically (a reader never sees half a token), like the kubelet's atomic writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    with contextlib.suppress(OSError):
        tmp.chmod(mode)
    tmp.replace(path)
