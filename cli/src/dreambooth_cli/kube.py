"""Connecting to a cluster as kubectl does (--kubeconfig, --context, --namespace), with one-line errors."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
import yaml
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from dreambooth_api import constants as api
from dreambooth_cli.errors import ApiError, CliError, ExitStatus

T = TypeVar("T")
REQUEST_TIMEOUT_SECONDS = 15


@dataclass(frozen=True)
class Target:
    """Where the commands go: an API client and the namespace to use."""

    api_client: client.ApiClient
    namespace: str
    host: str

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api_client)

    @property
    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client)


SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
"""In a pod: the token, CA and namespace of its service account."""


def kubeconfig_paths(kubeconfig: Path | None, environ: Mapping[str, str]) -> list[Path]:
    """The kubeconfig files kubectl reads: --kubeconfig, else the existing files of $KUBECONFIG, else ~/.kube/config."""
    if kubeconfig is not None:
        return [kubeconfig]
    listed = environ.get("KUBECONFIG")
    if listed:
        candidates = [Path(p).expanduser() for p in listed.split(os.pathsep) if p]
    else:
        candidates = [Path("~/.kube/config").expanduser()]
    return [p for p in candidates if p.is_file()]


def first_current_context(configs: list[Any]) -> str | None:
    """kubectl's merge rule: the current-context of the first file that sets one."""
    for cfg in configs:
        if isinstance(cfg, dict) and cfg.get("current-context"):
            return str(cfg["current-context"])
    return None


def context_namespace(configs: list[Any], name: str) -> str | None:
    """The namespace of the first context with this name (the first file wins, as in kubectl)."""
    for cfg in configs:
        contexts = cfg.get("contexts") if isinstance(cfg, dict) else None
        for entry in contexts if isinstance(contexts, list) else []:
            if isinstance(entry, dict) and entry.get("name") == name:
                ns = (entry.get("context") or {}).get("namespace")
                return str(ns) if ns else None
    return None


def read_kubeconfigs(paths: list[Path]) -> list[Any]:
    configs = []
    for path in paths:
        try:
            configs.append(yaml.safe_load(path.read_text()))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise CliError(f"{path}: unreadable kubeconfig: {err}", ExitStatus.NO_CLUSTER) from err
    return configs


def load_kubeconfig(paths: list[Path], context: str | None, configuration: client.Configuration) -> str:
    """Configure the client from the kubeconfig files; returns the chosen context's namespace."""
    configs = read_kubeconfigs(paths)
    files = ", ".join(str(p) for p in paths)
    chosen = context or first_current_context(configs)
    if chosen is None:
        raise CliError(f"no current-context in {files} (set one or pass --context)", ExitStatus.NO_CLUSTER)
    try:
        config.load_kube_config(
            config_file=os.pathsep.join(str(p) for p in paths), context=chosen, client_configuration=configuration
        )
    except (config.ConfigException, OSError, ValueError) as err:
        raise CliError(f"no usable kubeconfig ({files}): {err}", ExitStatus.NO_CLUSTER) from err
    return context_namespace(configs, chosen) or "default"


def load_in_cluster(configuration: client.Configuration, environ: Mapping[str, str]) -> str:
    """Configure the client from the pod's service account; returns its namespace."""
    loader = config.incluster_config.InClusterConfigLoader(
        token_filename=str(SERVICE_ACCOUNT_DIR / "token"),
        cert_filename=str(SERVICE_ACCOUNT_DIR / "ca.crt"),
        environ=environ,
    )
    try:
        loader.load_and_set(configuration)
    except config.ConfigException as err:
        raise CliError(
            "no cluster configured: no kubeconfig (set KUBECONFIG or --kubeconfig) and not running in a cluster",
            ExitStatus.NO_CLUSTER,
        ) from err
    try:
        namespace = (SERVICE_ACCOUNT_DIR / "namespace").read_text().strip()
    except OSError:
        namespace = ""
    return namespace or "default"


def connect(
    kubeconfig: Path | None, context: str | None, namespace: str | None, environ: Mapping[str, str] | None = None
) -> Target:
    """Load the kubeconfig (or the in-cluster config) like kubectl; the namespace defaults to the context's."""
    environ = os.environ if environ is None else environ
    if kubeconfig is not None and not kubeconfig.is_file():
        raise CliError(f"{kubeconfig}: kubeconfig not found", ExitStatus.NO_CLUSTER)
    configuration = client.Configuration()
    paths = kubeconfig_paths(kubeconfig, environ)
    if paths:
        default_namespace = load_kubeconfig(paths, context, configuration)
    elif context is not None:
        raise CliError(f"--context {context}: no kubeconfig (set KUBECONFIG or --kubeconfig)", ExitStatus.NO_CLUSTER)
    else:
        default_namespace = load_in_cluster(configuration, environ)
    configuration.retries = 1
    return Target(client.ApiClient(configuration), namespace or default_namespace, str(configuration.host))


def api_message(err: ApiException) -> str:
    """The `message` of a Kubernetes Status body, else the HTTP reason."""
    try:
        body = json.loads(err.body or "")
    except (TypeError, ValueError):
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return f"{err.status} {err.reason}"


def call(target: Target, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call the API, turning an unreachable server, 404 and other API errors into ApiErrors."""
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_SECONDS)
    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        raise api_error(target, err) from err
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise ApiError(f"no cluster reachable at {target.host}: {reason}", ExitStatus.NO_CLUSTER, None) from err


def api_error(target: Target, err: ApiException) -> ApiError:
    """An ApiError with the response's status: 404 is NOT_FOUND, the rest ERROR."""
    status = int(err.status) if err.status else None
    if status == 404:
        return ApiError(api_message(err), ExitStatus.NOT_FOUND, status)
    if status in (401, 403):
        return ApiError(f"not allowed by the cluster at {target.host}: {api_message(err)}", ExitStatus.ERROR, status)
    return ApiError(api_message(err), ExitStatus.ERROR, status)


def get_job(target: Target, name: str) -> dict[str, Any]:
    try:
        job: dict[str, Any] = call(
            target,
            target.custom.get_namespaced_custom_object,
            api.GROUP,
            api.VERSION,
            target.namespace,
            api.JOB_PLURAL,
            name,
        )
    except CliError as err:
        if err.status == ExitStatus.NOT_FOUND:
            raise CliError(
                f"{api.JOB_KIND} {name!r} not found in namespace {target.namespace!r}", ExitStatus.NOT_FOUND
            ) from err
        raise
    return job


def list_jobs(target: Target, all_namespaces: bool = False) -> list[dict[str, Any]]:
    if all_namespaces:
        result = call(target, target.custom.list_cluster_custom_object, api.GROUP, api.VERSION, api.JOB_PLURAL)
    else:
        result = call(
            target,
            target.custom.list_namespaced_custom_object,
            api.GROUP,
            api.VERSION,
            target.namespace,
            api.JOB_PLURAL,
        )
    items: list[dict[str, Any]] = result.get("items", [])
    return items


RETRY_INITIAL_SECONDS = 1.0
RETRY_MAX_SECONDS = 30.0


def retry_transient(
    fetch: Callable[[], T],
    *,
    give_up_at: float,
    on_retry: Callable[[ApiError, float], None],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """fetch(), retried with exponential backoff on transient errors (no response, 429, 5xx) until give_up_at.

    Other errors (404, 401/403, 400...) and a transient one whose next try would come after give_up_at are raised.
    """
    delay = RETRY_INITIAL_SECONDS
    while True:
        try:
            return fetch()
        except ApiError as err:
            if not err.transient or clock() + delay > give_up_at:
                raise
            on_retry(err, delay)
            sleep(delay)
            delay = min(delay * 2, RETRY_MAX_SECONDS)
