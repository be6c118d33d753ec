"""Pure resolution of a container's environment, command and args, as the kubelet does it.

Order and rules follow Kubernetes: ``envFrom`` sources first (in order, with their ``prefix``; keys that are not
valid variable names are skipped), then ``env`` entries in order, each ``value`` expanded with ``$(VAR)`` against
the variables defined before it. ``command`` and ``args`` are expanded against the final environment. A missing
non-optional ConfigMap, Secret or key is an error that the caller reports as ``CreateContainerConfigError``.
"""

from __future__ import annotations

import base64
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Protocol

_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_FIELD_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.+)'\]$")


class EnvResolutionError(Exception):
    """A reference cannot be resolved; the container must not start (``CreateContainerConfigError``)."""


class ObjectSource(Protocol):
    """Where ConfigMaps and Secrets come from (the API server in the agent, dicts in tests)."""

    def config_map(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The ConfigMap object, or None when it does not exist."""

    def secret(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The Secret object, or None when it does not exist."""


@dataclass(frozen=True)
class RuntimeFields:
    """Pod fields that only the node knows when the container starts (the pod object may not show them yet)."""

    pod_ip: str
    host_ip: str


def expand(text: str, lookup: Callable[[str], str | None]) -> str:
    """Kubernetes ``$(VAR)`` expansion: ``$$`` escapes a ``$``; unknown or unterminated references stay as written."""
    out: list[str] = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch != "$" or i + 1 >= n:
            out.append(ch)
            i += 1
            continue
        nxt = text[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "(":
            end = text.find(")", i + 2)
            if end < 0:
                out.append("$(")
                i += 2
            else:
                name = text[i + 2 : end]
                value = lookup(name)
                out.append(f"$({name})" if value is None else value)
                i = end + 1
        else:
            out.append("$" + nxt)
            i += 2
    return "".join(out)


def parse_quantity(text: str) -> Decimal:
    """A Kubernetes resource quantity (``500m``, ``2Gi``, ``1e3``, ``1.5``) as a number."""
    binary = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
    decimal = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1)}
    decimal |= {"k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12)}
    decimal |= {"P": Decimal(10**15), "E": Decimal(10**18)}
    s = str(text).strip()
    for suffix, factor in binary.items():
        if s.endswith(suffix):
            return _decimal(s[: -len(suffix)], text) * factor
    if s and s[-1] in decimal and not s[-1].isdigit() and s[-1] not in "eE":
        return _decimal(s[:-1], text) * decimal[s[-1]]
    return _decimal(s, text)


def _decimal(number: str, original: str) -> Decimal:
    try:
        return Decimal(number)
    except InvalidOperation as exc:
        raise EnvResolutionError(f"invalid quantity {original!r}") from exc


def field_value(pod: Mapping[str, Any], path: str, runtime: RuntimeFields) -> str:
    """The value of a ``fieldRef.fieldPath`` (the paths that the downward API supports for env)."""
    meta = pod.get("metadata", {})
    spec = pod.get("spec", {})
    simple: dict[str, str] = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": runtime.pod_ip,
        "status.podIPs": runtime.pod_ip,
        "status.hostIP": runtime.host_ip,
        "status.hostIPs": runtime.host_ip,
    }
    if path in simple:
        return simple[path]
    match = _FIELD_SUBSCRIPT.match(path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    raise EnvResolutionError(f"unsupported fieldPath {path!r}")


def resource_value(
    pod: Mapping[str, Any], container: Mapping[str, Any], ref: Mapping[str, Any], allocatable: Mapping[str, str]
) -> str:
    """The value of a ``resourceFieldRef``: the limit (node allocatable when unset) or request, over ``divisor``."""
    name = str(ref.get("containerName") or container.get("name"))
    target = next((c for c in pod.get("spec", {}).get("containers", []) if c.get("name") == name), container)
    kind, _, resource = str(ref.get("resource", "")).partition(".")
    if kind not in ("limits", "requests") or not resource:
        raise EnvResolutionError(f"unsupported resource {ref.get('resource')!r}")
    resources = target.get("resources") or {}
    raw = (resources.get(kind) or {}).get(resource)
    if raw is None and kind == "requests":
        raw = (resources.get("limits") or {}).get(resource)
    if raw is None:
        raw = allocatable.get(resource, "0") if kind == "limits" else "0"
    divisor = parse_quantity(str(ref.get("divisor") or "1"))
    if divisor == 0:
        raise EnvResolutionError("divisor must not be zero")
    return str(math.ceil(parse_quantity(str(raw)) / divisor))


def _object_data(obj: Mapping[str, Any], *, secret: bool) -> dict[str, str]:
    data: dict[str, str] = {}
    if secret:
        for key, value in (obj.get("data") or {}).items():
            data[key] = base64.b64decode(value).decode("utf-8", "replace")
        data.update(obj.get("stringData") or {})
    else:
        data.update(obj.get("data") or {})
        for key, value in (obj.get("binaryData") or {}).items():
            data[key] = base64.b64decode(value).decode("utf-8", "replace")
    return data


def _lookup_object(source: ObjectSource, namespace: str, name: str, *, secret: bool) -> dict[str, str] | None:
    obj = source.secret(namespace, name) if secret else source.config_map(namespace, name)
    return None if obj is None else _object_data(obj, secret=secret)


def resolve_env(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    source: ObjectSource,
    runtime: RuntimeFields,
    allocatable: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The container's environment from ``envFrom`` and ``env`` (not including the host variables)."""
    namespace = pod.get("metadata", {}).get("namespace", "")
    env: dict[str, str] = {}
    for item in container.get("envFrom") or []:
        is_secret = "secretRef" in item
        ref = item.get("secretRef") if is_secret else item.get("configMapRef")
        if not ref:
            continue
        data = _lookup_object(source, namespace, ref["name"], secret=is_secret)
        if data is None:
            if ref.get("optional"):
                continue
            kind = "secret" if is_secret else "configmap"
            raise EnvResolutionError(f'{kind} "{ref["name"]}" not found')
        prefix = item.get("prefix") or ""
        for key, value in data.items():
            if _ENV_NAME.match(prefix + key):
                env[prefix + key] = value
    for var in container.get("env") or []:
        resolved = _env_var_value(pod, container, var, source, runtime, allocatable or {}, env, namespace)
        if resolved is not None:
            env[var["name"]] = resolved
    return env


def _env_var_value(
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    var: Mapping[str, Any],
    source: ObjectSource,
    runtime: RuntimeFields,
    allocatable: Mapping[str, str],
    env: Mapping[str, str],
    namespace: str,
) -> str | None:
    value_from = var.get("valueFrom")
    if not value_from:
        return expand(str(var.get("value") or ""), env.get)
    for key, is_secret in (("configMapKeyRef", False), ("secretKeyRef", True)):
        ref = value_from.get(key)
        if not ref:
            continue
        data = _lookup_object(source, namespace, ref["name"], secret=is_secret)
        kind = "secret" if is_secret else "configmap"
        if data is None:
            if ref.get("optional"):
                return None
            raise EnvResolutionError(f'{kind} "{ref["name"]}" not found')
        if ref["key"] not in data:
            if ref.get("optional"):
                return None
            where = f"{kind.capitalize()} {namespace}/{ref['name']}"
            raise EnvResolutionError(f"couldn't find key {ref['key']} in {where}")
        return data[ref["key"]]
    if "fieldRef" in value_from:
        return field_value(pod, value_from["fieldRef"]["fieldPath"], runtime)
    if "resourceFieldRef" in value_from:
        return resource_value(pod, container, value_from["resourceFieldRef"], allocatable)
    raise EnvResolutionError(f"unsupported valueFrom for {var.get('name')!r}: {sorted(value_from)}")


def container_argv(
    container: Mapping[str, Any], env: Mapping[str, str], entrypoints: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """``command + args`` expanded against ``env``; without a ``command`` the image's configured entrypoint is used."""
    command = list(container.get("command") or [])
    if not command:
        command = list(image_entrypoint(str(container.get("image", "")), entrypoints or {}))
    if not command:
        raise EnvResolutionError(
            f"container {container.get('name')!r} has no command and image {container.get('image')!r} has no "
            "entrypoint configured in the node agent"
        )
    argv = [expand(str(part), env.get) for part in command]
    argv += [expand(str(part), env.get) for part in container.get("args") or []]
    return argv


def image_entrypoint(image: str, entrypoints: Mapping[str, Sequence[str]]) -> Sequence[str]:
    """The entrypoint for an image: an exact match first, then the image name without tag or digest."""
    if image in entrypoints:
        return entrypoints[image]
    bare = image.split("@", 1)[0]
    last = bare.rsplit("/", 1)[-1]
    if ":" in last:
        bare = bare[: len(bare) - len(last)] + last.split(":", 1)[0]
    return entrypoints.get(bare, ())


def image_pull_error(image: str) -> str | None:
    """Why pulling `image` fails, or None. The node agent runs commands, not images, so every image "pulls", except
    from a registry under the reserved `.invalid` domain (RFC 2606), which never resolves: that stands for a
    mistyped or unreachable registry, and the kubelet's ErrImagePull / ImagePullBackOff follow."""
    first = image.split("/", 1)[0] if "/" in image else ""
    host = first.rsplit(":", 1)[0]
    if host.endswith(".invalid"):
        return f'failed to pull and unpack image "{image}": dial tcp: lookup {host}: no such host'
    return None
