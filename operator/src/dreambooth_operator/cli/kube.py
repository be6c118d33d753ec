"""Connecting to a cluster as kubectl does (--kubeconfig, --context, --namespace), with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from dreambooth_operator.api import constants as api
from dreambooth_operator.cli.errors import CliError, ExitStatus

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


def connect(kubeconfig: Path | None, context: str | None, namespace: str | None) -> Target:
    """Load the kubeconfig (or the in-cluster config) like kubectl; the namespace defaults to the context's."""
    configuration = client.Configuration()
    config_file = str(kubeconfig) if kubeconfig else None
    if kubeconfig is not None and not kubeconfig.is_file():
        raise CliError(f"{kubeconfig}: kubeconfig not found", ExitStatus.NO_CLUSTER)
    context_namespace = "default"
    try:
        config.load_kube_config(config_file=config_file, context=context, client_configuration=configuration)
        contexts, active = config.list_kube_config_contexts(config_file=config_file)
        chosen = next((c for c in contexts if c.get("name") == context), None) if context else active
        if chosen:
            context_namespace = chosen.get("context", {}).get("namespace") or "default"
    except (config.ConfigException, OSError) as err:
        if kubeconfig is not None or context is not None:
            raise CliError(f"no usable kubeconfig: {err}", ExitStatus.NO_CLUSTER) from err
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            raise CliError(
                "no cluster configured: no kubeconfig (set KUBECONFIG or --kubeconfig) and not running in a cluster",
                ExitStatus.NO_CLUSTER,
            ) from err
    configuration.retries = 1
    return Target(client.ApiClient(configuration), namespace or context_namespace, str(configuration.host))


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
    """Call the API, turning an unreachable server, 404 and other API errors into CliErrors."""
    kwargs.setdefault("_request_timeout", REQUEST_TIMEOUT_SECONDS)
    try:
        return fn(*args, **kwargs)
    except ApiException as err:
        if err.status == 404:
            raise CliError(api_message(err), ExitStatus.NOT_FOUND) from err
        if err.status in (401, 403):
            raise CliError(f"not allowed by the cluster at {target.host}: {api_message(err)}") from err
        raise CliError(api_message(err)) from err
    except (urllib3.exceptions.HTTPError, OSError) as err:
        reason = getattr(err, "reason", None) or err
        raise CliError(f"no cluster reachable at {target.host}: {reason}", ExitStatus.NO_CLUSTER) from err


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
