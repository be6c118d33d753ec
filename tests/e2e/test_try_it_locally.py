"""README.md's "Try it locally", run exactly as written: `make cluster` in one terminal, the steps in another.

The commands are read from README.md between its `try-it-locally` markers, so the README and this test cannot
drift apart: the `up` block runs in the background (as the first terminal), the `steps` block runs as one bash
script (as the second terminal, with `set -e`: every line must succeed), and the test checks what the steps should
have produced. `make cluster` uses the repository's `.cluster/` (as a user's would): a cluster already running
there makes this test fail with `make cluster`'s own message, not stop it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from PIL import Image

from tests.infra.cluster import state_dir
from tests.infra.paths import ROOT
from tests.infra.processes import NotReadyError, wait_until

README = ROOT / "README.md"
UP_TIMEOUT = 240.0
STEPS_TIMEOUT = 1200.0


def readme_block(marker: str) -> str:
    """The fenced sh block right after `<!-- try-it-locally:<marker> -->` in README.md."""
    text = README.read_text()
    match = re.search(rf"<!-- try-it-locally:{marker} -->\n```sh\n(.*?)```\n", text, re.DOTALL)
    assert match, f"README.md has no ```sh block after <!-- try-it-locally:{marker} -->"
    return match.group(1)


def user_env() -> dict[str, str]:
    """A shell as a user would have it: no KUBECONFIG or test settings of ours, the repository's tools not on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "DBO_", "PYTEST"))}
    tools = (str(ROOT / ".venv" / "bin"), str(ROOT / ".tools" / "bin"))
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in tools)
    return env


def operator_scraped(prometheus: str) -> bool:
    """Prometheus has scraped the operator's pod (found through the API server by its `metrics` port): up == 1, and
    it has the chart's alerts loaded."""
    query = urllib.parse.urlencode({"query": 'up{job="pods",namespace="dreambooth-system"}'})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query?{query}", timeout=10) as response:  # noqa: S310
        samples = json.load(response)["data"]["result"]
    with urllib.request.urlopen(f"{prometheus}/api/v1/rules", timeout=10) as response:  # noqa: S310
        alerts = {r["name"] for g in json.load(response)["data"]["groups"] for r in g["rules"]}
    return any(s["value"][1] == "1" for s in samples) and "DreamBoothOperatorDown" in alerts


def test_readme_try_it_locally_runs_as_written(tmp_path: Path) -> None:
    up_block, steps = readme_block("up"), readme_block("steps")
    assert up_block.strip() == "make cluster"
    assert steps.strip().endswith("make cluster-down")
    root = state_dir()
    assert root == ROOT / ".cluster", "DBO_CLUSTER_DIR must not be set for this test (the README uses .cluster/)"
    log = tmp_path / "make-cluster.log"
    with log.open("wb") as out:
        up = subprocess.Popen(
            ["bash", "-c", up_block],
            cwd=ROOT,
            env=user_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:

        def is_up() -> bool:
            if up.poll() is not None:
                raise NotReadyError(f"make cluster exited with {up.returncode}:\n{log.read_text()[-4000:]}")
            return (root / "up.json").exists()

        wait_until(is_up, what="make cluster to be up", timeout=UP_TIMEOUT, details=lambda: log.read_text()[-4000:])
        info: dict[str, Any] = json.loads((root / "up.json").read_text())
        banner = log.read_text()
        assert f"export KUBECONFIG={root / 'kubeconfig'}" in banner
        assert "kubectl apply -f .cluster/examples/minimal-job.yaml" in banner
        print(f"make cluster was up in {info['seconds']}s")
        # Prometheus scrapes the operator's pod (found through the API server, by its `metrics` port).
        wait_until(lambda: operator_scraped(info["prometheus"]), what="Prometheus to scrape the operator", timeout=60)

        result = subprocess.run(
            ["bash", "-c", "set -euo pipefail\n" + steps],
            cwd=ROOT,
            env=user_env(),
            capture_output=True,
            text=True,
            timeout=STEPS_TIMEOUT,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"README steps failed ({result.returncode}):\n{output[-6000:]}"
        assert re.search(r"^minimal\s", result.stdout, re.MULTILINE), result.stdout  # `kubectl get dbj`'s row
        assert "dreamboothjob.dreambooth.dev/minimal created" in result.stdout
        assert "inferenceservice.dreambooth.dev/minimal condition met" in result.stdout
        images = sorted((root / "images").glob("*.png"))
        assert len(images) == 1, output[-3000:]
        with Image.open(images[0]) as image:
            assert image.size[0] > 0
            assert image.size == image.size[::-1]  # the model's square resolution
        # The last step, `make cluster-down`, stopped `make cluster` and everything it started.
        assert up.wait(timeout=60) == 0, log.read_text()[-3000:]
        assert not (root / "up.json").exists()
        assert not (root / "control-plane").exists()
        assert "stopped." in log.read_text()
    finally:
        if up.poll() is None:
            subprocess.run(["make", "cluster-down"], cwd=ROOT, env=user_env(), timeout=180, check=False)
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        up.wait(timeout=30)
