"""The Helm chart installed for real (`helm install`) into the test control plane, its operator run by the node agent.

    release = HelmRelease(kubeconfig, "dbo", "dbo-system")
    release.install(local_values(watch=["team-a"]))   # CRDs, RBAC, ServiceAccount, Deployment, ...
    release.upgrade("--set=verbose=true")              # rolls the operator pod
    release.test()                                     # `helm test`: the chart's test hook pod
    release.uninstall()                                # the pre-delete hook, then every object of the release

    with installed_operator(cluster, node_agent, namespace) as operator:   # a test's operator, from the chart
        ...; operator.log_tail()

The operator pod is the chart's own: the node agent runs the container's image entrypoint (the operator image maps to
the venv's `dreambooth-operator`, tests/nodeagent/config.py), with the chart's env and probes, as the chart's
ServiceAccount (a token from the TokenRequest API in the pod's token volume, and `KUBERNETES_SERVICE_HOST/PORT`:
in-cluster config, tests/nodeagent/volumes.py). `local_values` holds the few values a machine without pod networks
needs; each says why. Used by tests/e2e/test_helm_install.py, tests/e2e/test_kueue.py (`installed_operator`) and by
`make cluster` (tests/infra/cluster.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.infra.controlplane import Cluster
from tests.infra.operator import RESTRICTED, items
from tests.infra.paths import ROOT
from tests.infra.processes import TOOLS_BIN, tool

CHART = ROOT / "charts" / "dreambooth-operator"
README = ROOT / "README.md"
INSTANCE_LABEL = "app.kubernetes.io/instance"


def local_values(*, watch: Sequence[str] = (), reconcile_seconds: float | None = None) -> dict[str, Any]:
    """Values for an install whose pods run on the node agent (everything else is the chart's default).

    - `extraEnv` DREAMBOOTH_OPERATOR_BIND_ADDRESS = the pod IP: pods here share the machine's network, so the
      operator's /metrics and /healthz (ports 8000 and 8081, the chart's) must bind its own 127.x pod IP, not
      0.0.0.0, or two operators (or anything else on the machine) would clash. The chart keeps 0.0.0.0, which is
      right in a cluster (`kubectl port-forward` reaches the pod's localhost).
    - `reconcile_seconds`: a shorter reconcile interval for tests (the default, 12 s, works too).
    """
    env: list[dict[str, Any]] = [
        {"name": "DREAMBOOTH_OPERATOR_BIND_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    ]
    if reconcile_seconds is not None:
        env.append({"name": "DREAMBOOTH_OPERATOR_RECONCILE_INTERVAL_SECONDS", "value": str(reconcile_seconds)})
    return {"watchNamespaces": list(watch), "extraEnv": env}


def readme_helm_lines() -> list[list[str]]:
    """The `helm` lines of the README's "Install on a cluster" section, each split as the shell splits it (after
    `helm`; comments dropped), in order."""
    section = README.read_text().split("\n## Install on a cluster\n", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(ln, comments=True)[1:] for ln in section.splitlines() if ln.startswith("helm ")]


def readme_install_args() -> list[str]:
    """The README's "Install on a cluster" `helm install` line, split as the shell splits it (after `helm`)."""
    (args,) = [a for a in readme_helm_lines() if a[:1] == ["install"]]
    return args


class HelmError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{' '.join(map(str, self.cmd))} exited with {self.returncode}\n{self.stdout}\n{self.stderr}"


@dataclass
class HelmRelease:
    """One release of the chart, driven through the `helm` CLI (as a user would)."""

    kubeconfig: Path
    name: str
    namespace: str
    chart: Path = CHART
    install_args: tuple[str, ...] = field(default=())
    """`helm install`'s arguments as a user types them (the README's line); empty: built from the fields."""

    @classmethod
    def from_readme(cls, kubeconfig: Path) -> HelmRelease:
        """The release the README's "Install on a cluster" section installs, with that section's exact arguments."""
        args = readme_install_args()
        if args[:1] != ["install"] or "--namespace" not in args:
            raise ValueError(f"the README's helm install line is not `helm install NAME CHART --namespace NS`: {args}")
        name, chart, namespace = args[1], ROOT / args[2], args[args.index("--namespace") + 1]
        return cls(kubeconfig, name, namespace, chart, tuple(args))

    def helm(self, *args: str, input: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PATH": f"{TOOLS_BIN}{os.pathsep}{os.environ['PATH']}"}
        argv = [str(tool("helm")), *args]
        result = subprocess.run(
            argv, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False, cwd=ROOT
        )
        if result.returncode != 0:
            raise HelmError(result.returncode, argv, result.stdout, result.stderr)
        return result

    def install(self, values: dict[str, Any], *extra: str, timeout_s: int = 180) -> str:
        """`helm install --create-namespace --wait` (the operator pod Ready); returns helm's output (NOTES.txt)."""
        typed = self.install_args or (
            "install",
            self.name,
            str(self.chart),
            "--namespace",
            self.namespace,
            "--create-namespace",
        )
        return self.helm(
            *typed,
            "--values",
            "-",
            "--wait",
            f"--timeout={timeout_s}s",
            *extra,
            input=yaml.safe_dump(values),
            timeout=timeout_s + 60,
        ).stdout

    def upgrade(self, *extra: str, timeout_s: int = 180) -> str:
        """`helm upgrade --reuse-values --wait` with `extra` (for example `--set=verbose=true`)."""
        return self.helm(
            "upgrade",
            self.name,
            str(self.chart),
            "--namespace",
            self.namespace,
            "--reuse-values",
            "--wait",
            f"--timeout={timeout_s}s",
            *extra,
            timeout=timeout_s + 60,
        ).stdout

    def uninstall(self, timeout_s: int = 180) -> str:
        """`helm uninstall --wait`: the pre-delete hook (the operator stopped, its finalizer taken off the resources
        it watched), then every object of the release gone; the CRDs stay, as Helm leaves them."""
        argv = ("uninstall", self.name, "--namespace", self.namespace, "--wait", f"--timeout={timeout_s}s")
        return self.helm(*argv, timeout=timeout_s + 60).stdout

    def test(self, *typed: str, timeout_s: int = 180) -> str:
        """`helm test` (the chart's test hooks), with the arguments a user types (default: NAME --namespace NS)."""
        argv = typed or ("test", self.name, "--namespace", self.namespace)
        return self.helm(*argv, f"--timeout={timeout_s}s", timeout=timeout_s + 60).stdout

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.helm("status", self.name, "-n", self.namespace, "-o", "json").stdout)
        return result

    def manifest(self) -> list[dict[str, Any]]:
        """The objects of the release as Helm rendered them (`helm get manifest`)."""
        text = self.helm("get", "manifest", self.name, "-n", self.namespace).stdout
        return [d for d in yaml.safe_load_all(text) if d]

    @property
    def selector(self) -> str:
        return f"{INSTANCE_LABEL}={self.name}"

    @property
    def fullname(self) -> str:
        """The chart's `dbo.fullname`: the name of its Deployment and ServiceAccount (release names here are short)."""
        return self.name if CHART.name in self.name else f"{self.name}-{CHART.name}"


def operator_pods(cluster: Cluster, release: HelmRelease) -> list[dict[str, Any]]:
    """The release's operator pods (the Deployment's selector; the hooks' pods do not carry the name label)."""
    selector = f"app.kubernetes.io/name={CHART.name},{release.selector}"
    return items(cluster, "pods", release.namespace, selector)


@dataclass
class InstalledOperator:
    """The chart's operator, installed by `helm install` and run by the node agent, for one test."""

    cluster: Cluster
    node_agent: Any
    release: HelmRelease

    def pods(self) -> list[dict[str, Any]]:
        return operator_pods(self.cluster, self.release)

    def log_tail(self, chars: int = 4000) -> str:
        """The operator pods' logs (as the node agent kept them) and the agent's own tail."""
        ns = self.release.namespace
        logs = [str(self.node_agent.logs(ns, p["metadata"]["name"]))[-chars:] for p in self.pods()]
        return "\n".join([*logs, str(self.node_agent.log_tail())])


@contextlib.contextmanager
def installed_operator(
    cluster: Cluster, node_agent: Any, namespace: str, *extra: str, reconcile_seconds: float = 2
) -> Iterator[InstalledOperator]:
    """The chart installed into `namespace` watching only it (Pod Security "restricted" enforced there), the operator
    pod Ready; `helm uninstall` (with its pre-delete hook) afterwards. The release is named for the namespace, and
    leaves the cluster-wide aggregated roles to the README's release (tests/e2e/test_helm_install.py).
    `extra`: more `helm install` flags."""
    cluster.kubectl("label", "--overwrite", "namespace", namespace, *RESTRICTED)
    release = HelmRelease(cluster.kubeconfig, f"dbo-{namespace[-8:]}", namespace)
    values = local_values(watch=[namespace], reconcile_seconds=reconcile_seconds)
    operator = InstalledOperator(cluster, node_agent, release)
    try:
        release.install(values, "--set=rbac.aggregatedRoles=false", *extra)
    except HelmError as err:
        raise AssertionError(f"{err}\n{operator.log_tail()}") from err
    # (`--wait`: the Deployment's pod is Ready.) It is the chart's: the operator image, as the chart's ServiceAccount.
    (pod,) = operator.pods()
    assert pod["spec"]["containers"][0]["image"].startswith("ghcr.io/dreambooth-operator/operator:"), pod["spec"]
    assert pod["spec"]["serviceAccountName"] == release.fullname, pod["spec"]
    try:
        yield operator
    finally:
        release.uninstall()
