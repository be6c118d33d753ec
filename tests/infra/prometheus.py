"""Prometheus (and promtool) for scrape, rule and dashboard-query tests.

`start_prometheus(...)` writes a config with static scrape targets and/or rule files, starts Prometheus on a
free loopback port and returns a `PrometheusServer` once `/-/ready` answers. Queries go through the HTTP API.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.infra.processes import (
    DEFAULT_TIMEOUT_S,
    ManagedProcess,
    NotReadyError,
    free_port,
    http_get,
    retry_on_port_clash,
    start_process,
    tool,
)

Sample = dict[str, Any]
"""One element of an instant-query result: {"metric": {label: value}, "value": [ts, "string value"]}."""


def promtool_path() -> Path:
    """Path of the pinned `promtool` binary."""
    return tool("promtool")


def run_promtool(*args: str | Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run `promtool *args` (stdin from `input`); returns the completed process without raising."""
    return subprocess.run(
        [str(promtool_path()), *(str(a) for a in args)],
        input=input,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def prometheus_config(
    *,
    scrape_configs: Sequence[Mapping[str, Any]],
    rule_files: Sequence[Path],
    scrape_interval: str,
    evaluation_interval: str,
) -> dict[str, Any]:
    """The prometheus.yml content (as a dict; JSON is valid YAML)."""
    return {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": evaluation_interval,
        },
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [dict(c) for c in scrape_configs],
    }


def static_scrape_config(job: str, targets: Sequence[str], *, metrics_path: str = "/metrics") -> dict[str, Any]:
    """A scrape config for fixed `host:port` targets."""
    return {"job_name": job, "metrics_path": metrics_path, "static_configs": [{"targets": list(targets)}]}


@dataclass
class PrometheusServer:
    """A running Prometheus. `url` is http://127.0.0.1:<port>."""

    url: str
    config_file: Path
    process: ManagedProcess
    rule_files: list[Path] = field(default_factory=list)

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/<path>; return `data` or raise RuntimeError with Prometheus' error."""
        query = urllib.parse.urlencode(params)
        status, body = http_get(f"{self.url}/api/v1/{path}" + (f"?{query}" if query else ""), timeout=10.0)
        payload = json.loads(body)
        if status != 200 or payload.get("status") != "success":
            msg = f"Prometheus {path} {params}: HTTP {status}: {payload.get('errorType')}: {payload.get('error')}"
            raise RuntimeError(msg)
        return payload["data"]

    def query(self, promql: str) -> list[Sample]:
        """Instant query; returns the vector (a scalar or string result comes back as a one-element list)."""
        data = self.api("query", query=promql)
        result = data["result"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": result}]
        return list(result)

    def wait_for(
        self,
        promql: str,
        predicate: Callable[[list[Sample]], bool] = bool,
        timeout: float = 60.0,
    ) -> list[Sample]:
        """Poll `query(promql)` until `predicate(result)` holds (default: non-empty); return that result."""
        deadline = time.monotonic() + timeout
        last: list[Sample] | str = "no result yet"
        while time.monotonic() < deadline:
            try:
                result = self.query(promql)
            except (RuntimeError, OSError, ValueError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            else:
                if predicate(result):
                    return result
                last = result
            time.sleep(0.5)
        msg = f"timed out after {timeout:.0f}s waiting for {promql!r} to satisfy the predicate; last result: {last}"
        raise NotReadyError(msg + "\n" + self.process.describe())

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets (each with `health`, `lastError`, `labels`, ...)."""
        data = self.api("targets", state="active")
        return list(data["activeTargets"])

    def rules(self) -> list[dict[str, Any]]:
        """The loaded rule groups."""
        return list(self.api("rules")["groups"])

    def alerts(self) -> list[dict[str, Any]]:
        """Active (pending or firing) alerts."""
        return list(self.api("alerts")["alerts"])

    def ready(self) -> bool:
        status, _ = http_get(f"{self.url}/-/ready", timeout=3.0)
        return status == 200

    def stop(self) -> None:
        self.process.stop()


def start_prometheus(
    work_dir: Path,
    log_dir: Path,
    *,
    scrape_configs: Sequence[Mapping[str, Any]] = (),
    rule_files: Sequence[Path] = (),
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    name: str = "prometheus",
    timeout: float = DEFAULT_TIMEOUT_S,
) -> PrometheusServer:
    """Start Prometheus with the given scrape configs and rule files; return it once /-/ready is 200."""
    work_dir.mkdir(parents=True, exist_ok=True)
    config_file = work_dir / "prometheus.yml"
    config = prometheus_config(
        scrape_configs=scrape_configs,
        rule_files=rule_files,
        scrape_interval=scrape_interval,
        evaluation_interval=evaluation_interval,
    )
    config_file.write_text(json.dumps(config, indent=2) + "\n")

    def attempt() -> PrometheusServer:
        port = free_port()
        proc = start_process(
            name,
            [
                tool("prometheus"),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--web.enable-lifecycle",
                # Short look-back so that a target that stops answering drops out of queries quickly.
                "--query.lookback-delta=30s",
                "--log.level=warn",
            ],
            log_dir=log_dir,
        )
        server = PrometheusServer(
            url=f"http://127.0.0.1:{port}", config_file=config_file, process=proc, rule_files=list(rule_files)
        )
        try:
            proc.wait_ready(server.ready, what=f"Prometheus {server.url}/-/ready", timeout=timeout)
        except BaseException:
            proc.stop()
            raise
        return server

    return retry_on_port_clash(attempt)
