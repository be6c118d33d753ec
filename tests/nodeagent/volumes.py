"""The volumes the agent gives pods: projected volumes (above all the ServiceAccount token) and configMap and secret
volumes, refreshed when their object changes, as the kubelet does.

The ServiceAccount admission plugin adds a ``kube-api-access-*`` volume to every pod whose ServiceAccount token is
automounted: a ``projected`` volume of a ``serviceAccountToken`` (a token bound to the pod), the ``kube-root-ca.crt``
ConfigMap's ``ca.crt`` and the namespace (``downwardAPI``), mounted at ``/var/run/secrets/kubernetes.io/
serviceaccount``. As the kubelet does, the agent asks the TokenRequest API for that token (bound to the pod's name
and uid, so it stops working when the pod is gone), writes the files into the pod's state folder
(``<pod dir>/volumes/<volume>/``), refreshes the token at 80% of its lifetime, and bind-mounts the folder at the
``mountPath`` inside the container's own mount namespace (runtime.py), so a program finds it where in-cluster
configuration looks. With ``KUBERNETES_SERVICE_HOST``/``PORT`` (agent.py: the API server of the agent's kubeconfig,
as kube-proxy would route the ``kubernetes`` Service), ``load_incluster_config()`` works unchanged. A projected
volume's other sources are written once, at the first container start.

A ``configMap`` or ``secret`` volume is laid out as the kubelet's atomic writer lays it out: the files in a
timestamped folder ``..<time>.<random>/``, the symlink ``..data`` to it, and one symlink per top-level entry through
``..data`` (``key -> ..data/key``). Every ``SYNC_SECONDS`` while the pod runs the agent reads the object again, and
when the content changed it writes a new timestamped folder and swaps ``..data`` with one rename, so a reader sees
the old set of files or the new one, never a mix, and a file's path keeps naming the newest content (through a new
inode). An ``optional`` volume whose object does not exist is an empty folder until it does; a non-optional one
blocks the container (``CreateContainerConfigError``) until it exists, and if it goes away later the last content
stays (both as the kubelet). The kubelet syncs on its periodic pod sync (about a minute); the agent syncs every
second, so that tests wait on a condition instead of a minute.

Other volume types (emptyDir, persistentVolumeClaim, ...) are not mounted: containers of a pod share its working
directory instead (README.md).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

from .envresolve import EnvResolutionError, ObjectSource, RuntimeFields, field_value
from .kube import ApiException, Kube

log = logging.getLogger(__name__)

DEFAULT_TOKEN_SECONDS: Final = 3600
REFRESH_FRACTION: Final = 0.8  # the kubelet renews a projected token once 80% of its lifetime has passed
SYNC_SECONDS: Final = 1.0
"""How often a running pod's configMap and secret volumes are compared with their objects (the kubelet: ~1 min)."""
DEFAULT_MODE: Final = 0o644
DATA_LINK: Final = "..data"

Files = dict[str, tuple[bytes, int]]
"""A volume's content: relative path -> (bytes, mode)."""


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
class _Synced:
    """A configMap or secret volume: what was written last, and when to compare it with its object again."""

    name: str
    folder: Path
    source: Mapping[str, Any]
    """The volume's ``configMap`` or ``secret`` field."""
    secret: bool
    files: Files
    sync_at: float


@dataclass
class PodVolumes:
    """The projected, configMap and secret volumes of one pod, written under ``root`` on first use."""

    kube: Kube
    source: ObjectSource
    root: Path
    written: set[str] = field(default_factory=set)
    tokens: list[_Token] = field(default_factory=list)
    synced: dict[str, _Synced] = field(default_factory=dict)

    @property
    def renewing(self) -> bool:
        """Whether ``refresh`` has anything to do while the pod runs (tokens to renew, objects to follow)."""
        return bool(self.tokens or self.synced)

    def mounts(self, pod: Mapping[str, Any], container: Mapping[str, Any], runtime: RuntimeFields) -> list[Mount]:
        """The container's mounts of projected, configMap and secret volumes (written now if needed); other volume
        types are skipped.

        Raises EnvResolutionError (the container stays ``CreateContainerConfigError``) when a source is missing."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts: list[Mount] = []
        for item in container.get("volumeMounts") or []:
            name = item["name"]
            volume = volumes.get(name) or {}
            folder = self.root / name
            read_only = bool(item.get("readOnly", False))
            if "projected" in volume:
                if name not in self.written:
                    self._write(pod, name, volume["projected"], folder, runtime)
                    self.written.add(name)
            elif "configMap" in volume or "secret" in volume:
                if name not in self.synced:
                    self._first_sync(pod, name, volume, folder)
                read_only = True  # the kubelet mounts configMap and secret volumes read-only, whatever the mount says
            else:
                continue
            target = str(item["mountPath"])
            Path(target).mkdir(parents=True, exist_ok=True)  # a mount point must exist (empty on the host)
            mounts.append(Mount(folder, target, read_only))
        return mounts

    def refresh(self, pod: Mapping[str, Any]) -> None:
        """Renew the tokens past 80% of their lifetime (in place: running containers see the new file), and swap in
        the new content of configMap and secret volumes whose object changed.

        Raises ApiException when a token cannot be renewed (the caller retries); a volume's object that cannot be
        read keeps its last content and is asked again at the next sync, as the kubelet does."""
        now = time.monotonic()
        for volume in self.synced.values():
            if now >= volume.sync_at:
                self._sync(pod, volume)
        for token in self.tokens:
            if now >= token.refresh_at:
                self._write_token(pod, token)

    # ---- configMap and secret volumes ------------------------------------------------------------------------
    def _first_sync(self, pod: Mapping[str, Any], name: str, volume: Mapping[str, Any], folder: Path) -> None:
        secret = "secret" in volume
        ref = volume["secret" if secret else "configMap"]
        files = self._volume_files(pod, name, ref, secret=secret)
        write_atomically(folder, files)
        self.synced[name] = _Synced(name, folder, ref, secret, files, time.monotonic() + SYNC_SECONDS)

    def _sync(self, pod: Mapping[str, Any], volume: _Synced) -> None:
        volume.sync_at = time.monotonic() + SYNC_SECONDS
        try:
            files = self._volume_files(pod, volume.name, volume.source, secret=volume.secret)
        except (EnvResolutionError, ApiException) as exc:
            log.warning("pod %s: volume %s keeps its content (%s)", pod["metadata"]["name"], volume.name, exc)
            return
        if files == volume.files:
            return
        try:
            write_atomically(volume.folder, files)
        except OSError as exc:
            log.warning("pod %s: volume %s not updated (%s)", pod["metadata"]["name"], volume.name, exc)
            return
        volume.files = files
        log.info("pod %s/%s: volume %s updated", pod["metadata"]["namespace"], pod["metadata"]["name"], volume.name)

    def _volume_files(self, pod: Mapping[str, Any], name: str, ref: Mapping[str, Any], *, secret: bool) -> Files:
        namespace = pod["metadata"]["namespace"]
        object_name = ref["secretName"] if secret else ref["name"]
        obj = self.source.secret(namespace, object_name) if secret else self.source.config_map(namespace, object_name)
        if obj is None:
            if ref.get("optional"):
                return {}
            kind = "secret" if secret else "configmap"
            raise EnvResolutionError(f'{kind} "{object_name}" not found (volume {name})')
        mode = int(ref.get("defaultMode", DEFAULT_MODE))
        return _object_files(obj, ref, mode, secret=secret, optional=bool(ref.get("optional")), volume=name)

    # ---- projected volumes -----------------------------------------------------------------------------------
    def _write(
        self, pod: Mapping[str, Any], name: str, projected: Mapping[str, Any], folder: Path, runtime: RuntimeFields
    ) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        mode = int(projected.get("defaultMode", DEFAULT_MODE))
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
                files = _object_files(obj, ref, mode, secret=is_secret, optional=False, volume=name)
                for path, (content, file_mode) in files.items():
                    _write_file(folder / path, content, file_mode)
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


def _object_files(
    obj: Mapping[str, Any], ref: Mapping[str, Any], mode: int, *, secret: bool, optional: bool, volume: str
) -> Files:
    """A ConfigMap's or Secret's files: every key, or the ``items`` chosen (a missing key is an error unless the
    volume is optional, as the kubelet has it)."""
    data = _data(obj, secret=secret)
    items = ref.get("items") or [{"key": k, "path": k} for k in sorted(data)]
    files: Files = {}
    for entry in items:
        if entry["key"] not in data:
            if optional:
                continue
            raise EnvResolutionError(f"couldn't find key {entry['key']} in {obj['metadata']['name']} (volume {volume})")
        files[entry["path"]] = (data[entry["key"]], int(entry.get("mode", mode)))
    return files


def _data(obj: Mapping[str, Any], *, secret: bool) -> dict[str, bytes]:
    data: dict[str, bytes] = {}
    encoded = obj.get("data") or {}
    if secret:
        data.update({k: base64.b64decode(v) for k, v in encoded.items()})
    else:
        data.update({k: str(v).encode() for k, v in encoded.items()})
        data.update({k: base64.b64decode(v) for k, v in (obj.get("binaryData") or {}).items()})
    return data


def write_atomically(folder: Path, files: Files) -> None:
    """The kubelet's atomic writer: ``files`` in a new timestamped folder, ``..data`` swapped to it with one rename,
    a symlink per top-level entry through ``..data``; then stale entries and the previous folder go."""
    folder.mkdir(parents=True, exist_ok=True)
    data_link = folder / DATA_LINK
    previous = data_link.readlink().name if data_link.is_symlink() else None
    fresh = Path(tempfile.mkdtemp(prefix=datetime.now(UTC).strftime("..%Y_%m_%d_%H_%M_%S."), dir=folder))
    fresh.chmod(0o755)  # mkdtemp's 0700 would hide the files from a container running as another user
    for path, (content, mode) in files.items():
        target = fresh / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
        target.chmod(mode)
    swap = folder / f"{DATA_LINK}_tmp"
    swap.unlink(missing_ok=True)
    swap.symlink_to(fresh.name)
    swap.replace(data_link)
    visible = {path.split("/")[0] for path in files}
    for name in visible:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(f"{DATA_LINK}/{name}")
    for entry in folder.iterdir():
        if not entry.name.startswith("..") and entry.name not in visible:
            entry.unlink()
    if previous is not None and previous != fresh.name:
        shutil.rmtree(folder / previous, ignore_errors=True)


def _write_file(path: Path, content: bytes, mode: int) -> None:
    """Atomically (a reader never sees half a token), like the kubelet's atomic writer."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(content)
    with contextlib.suppress(OSError):
        tmp.chmod(mode)
    tmp.replace(path)
