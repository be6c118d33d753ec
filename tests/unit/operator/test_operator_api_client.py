"""The operator's API client: retries and a request timeout, set on the Configuration before the ApiClient (and its
connection pool) is built; checked on the built client and against a local HTTP server that answers 503 once."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from kubernetes.config import kube_config
from urllib3.util.retry import Retry

from dreambooth_operator import kube


class Flaky(BaseHTTPRequestHandler):
    """Answers the first request of each method with 503, then 200 with an empty object."""

    seen: dict[str, int] = {}  # noqa: RUF012 - reset by the fixture

    def _answer(self) -> None:
        count = Flaky.seen.get(self.command, 0)
        Flaky.seen[self.command] = count + 1
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, body = (503, {"kind": "Status", "code": 503}) if count == 0 else (200, {"kind": "ConfigMap"})
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PATCH = do_DELETE = _answer  # noqa: N815 - http.server's handler names

    def log_message(self, *_: Any) -> None:
        pass


@pytest.fixture
def server_kubeconfig(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    Flaky.seen = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{server.server_port}"}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    path = tmp_path / "kubeconfig"
    path.write_text(json.dumps(config))
    monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(path))  # read from $KUBECONFIG at import
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    yield path
    server.shutdown()


def test_the_built_client_has_the_retries_and_the_timeout(
    server_kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = kube.load_api_client(7, retries=4)
    pool_retries = api.rest_client.pool_manager.connection_pool_kw["retries"]
    assert isinstance(pool_retries, Retry)
    assert (pool_retries.total, pool_retries.connect, pool_retries.status) == (4, 4, 4)
    assert {429, 503} <= set(pool_retries.status_forcelist or ())
    assert not {"POST", "PATCH"} & set(pool_retries.allowed_methods or ())
    # Every request gets the timeout unless it names its own.
    timeouts: list[Any] = []
    real = api.rest_client.request

    def spy(*args: Any, **kwargs: Any) -> Any:
        timeouts.append(kwargs.get("_request_timeout"))
        return real(*args, **kwargs)

    monkeypatch.setattr(api.rest_client, "request", spy)
    Flaky.seen = {"GET": 1}
    kube.request(api, "GET", "/api/v1/namespaces/a/configmaps/x")
    kube.request(api, "GET", "/api/v1/namespaces/a/configmaps/x", timeout=2.5)
    assert timeouts == [7, 2.5]
    api.close()


def test_a_503_is_retried_for_a_get_and_a_delete_never_for_a_post(server_kubeconfig: Path) -> None:
    api = kube.load_api_client(5, retries=2)
    assert kube.get(api, "v1", "ConfigMap", "a", "x") == {"kind": "ConfigMap"}
    assert kube.delete(api, "v1", "ConfigMap", "a", "x", uid="u1") is True
    with pytest.raises(ApiException) as err:
        kube.create(api, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x", "namespace": "a"}})
    assert err.value.status == 503
    assert Flaky.seen == {"GET": 2, "DELETE": 2, "POST": 1}
    api.close()
