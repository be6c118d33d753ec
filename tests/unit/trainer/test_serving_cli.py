"""`dreambooth generate` against a running server (its `--url` way; the API server's service proxy is the e2e
test's): PNGs named after the model and seed, a progress line, the server's errors as one line and an exit status,
a server still loading waited out."""

from __future__ import annotations

import json
import threading
from base64 import b64encode
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import urllib3
import yaml
from PIL import Image
from serving_support import PROMPT, config, lora_subject, running

from dreambooth_cli.app import main
from dreambooth_cli.client import DreamBoothClient
from dreambooth_cli.errors import CliError, ExitStatus
from dreambooth_trainer.serving.server import Server

TOKEN = "cli-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("cli")
    cfg = config(adapters=[{"name": "dog", "uri": lora_subject(root, 1).as_uri(), "weight": 1.0}])
    with running(cfg, root / "work", token=TOKEN) as srv:
        yield srv


def test_generate_writes_pngs_with_a_progress_line(
    server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{server.port}"
    args = ["generate", "dog-server", "--url", url, "--token", TOKEN, "-p", PROMPT, "--subject", "dog"]
    main([*args, "-n", "2", "--seed", "9", "--size", "32x32", "-o", str(tmp_path)])  # returns: exit status 0
    captured = capsys.readouterr()
    assert "dog-server: generating 2 images of dog at 32x32 ..." in captured.err
    assert "dog-server: 2 image(s) in" in captured.err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dog-10.png", "dog-9.png"]
    assert f"{tmp_path / 'dog-9.png'}  (seed 9)" in captured.out
    assert Image.open(tmp_path / "dog-9.png").size == (32, 32)


@pytest.mark.parametrize(
    ("extra", "status", "message"),
    [
        (["--subject", "cat"], ExitStatus.NOT_FOUND, "the model 'cat' does not exist"),
        (["--size", "1024x1024"], ExitStatus.INVALID_INPUT, "maxResolution=64"),
        (["--token", "wrong"], ExitStatus.ERROR, "(pass --token)"),
    ],
)
def test_server_errors_are_one_line_and_an_exit_status(
    server: Server, tmp_path: Path, extra: list[str], status: ExitStatus, message: str
) -> None:
    client = DreamBoothClient()
    token = extra[1] if extra[0] == "--token" else TOKEN
    subject = extra[1] if extra[0] == "--subject" else None
    size = extra[1] if extra[0] == "--size" else None
    with pytest.raises(CliError) as caught:
        client.generate(
            "dog-server",
            PROMPT,
            tmp_path,
            url=f"http://127.0.0.1:{server.port}",
            token=token,
            subject=subject,
            size=size,
        )
    assert caught.value.status == status
    assert message in caught.value.message


def test_a_server_still_loading_is_waited_out(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "no-cluster"))  # no token to look up
    release = threading.Event()
    srv = Server(config(), "127.0.0.1", 0, workdir=tmp_path / "work")
    real = srv.runner.load
    srv.runner.load = lambda: (release.wait(60), real())[1]  # type: ignore[method-assign]
    srv.start()
    notes: list[str] = []

    def waiting(note: str) -> None:
        notes.append(note)
        release.set()

    try:
        images = DreamBoothClient().generate(
            "s", PROMPT, tmp_path / "out", url=f"http://127.0.0.1:{srv.port}", seed=1, timeout=120, on_wait=waiting
        )
    finally:
        release.set()
        srv.stop()
    assert [i.path.name for i in images] == ["s-1.png"]
    assert notes
    assert "not ready" in notes[0]
    assert "retrying in 2s" in notes[0]


class FakeApiServer(ThreadingHTTPServer):
    """The Kubernetes API server as `dreambooth generate` uses it: the InferenceService, its auth Secret, and the
    service proxy (which, as the real one, does not pass the Authorization header on)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.proxied: list[dict[str, str]] = []
        super().__init__(("127.0.0.1", 0), _FakeApiHandler)


class _FakeApiHandler(BaseHTTPRequestHandler):
    server: FakeApiServer

    def log_message(self, format: str, *args: Any) -> None:
        return

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        assert self.headers["Authorization"] == "Bearer kube-admin"
        if self.path == "/apis/dreambooth.dev/v1alpha1/namespaces/ns/inferenceservices/dog-server":
            isvc = {"metadata": {"name": "dog-server"}, "spec": {"auth": {"bearerTokenSecret": {"name": "tok"}}}}
            self._send(200, json.dumps(isvc).encode())
        elif self.path == "/api/v1/namespaces/ns/secrets/tok":
            secret = {
                "kind": "Secret",
                "metadata": {"name": "tok"},
                "data": {"token": b64encode(TOKEN.encode()).decode()},
            }
            self._send(200, json.dumps(secret).encode())
        else:
            self._send(404, json.dumps({"kind": "Status", "message": f"{self.path} not found"}).encode())

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/api/v1/namespaces/ns/services/dog-server:http/proxy/v1/images/generations"
        self.server.proxied.append(dict(self.headers))
        forward = {"Content-Type": "application/json", "api-key": self.headers.get("api-key", "")}
        answer = urllib3.request("POST", self.server.backend + "/v1/images/generations", body=body, headers=forward)
        self._send(answer.status, answer.data)


def test_generate_through_the_api_servers_service_proxy(server: Server, tmp_path: Path) -> None:
    """Without --url: the kubeconfig's API server, the token from the service's Secret sent as api-key."""
    fake = FakeApiServer(f"http://127.0.0.1:{server.port}")
    threading.Thread(target=fake.serve_forever, daemon=True).start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": f"http://127.0.0.1:{fake.server_port}"}}],
                "users": [{"name": "u", "user": {"token": "kube-admin"}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "ns"}}],
                "current-context": "x",
            }
        )
    )
    try:
        images = DreamBoothClient(kubeconfig).generate("dog-server", PROMPT, tmp_path / "out", seed=4, size="32x32")
    finally:
        fake.shutdown()
    assert [i.path.name for i in images] == ["dog-server-4.png"]
    assert fake.proxied[0]["api-key"] == TOKEN
