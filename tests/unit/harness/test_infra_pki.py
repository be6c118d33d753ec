"""Control-plane PKI and kubeconfigs: the serving cert verifies for the right names; tokens and kubeconfigs parse."""

from __future__ import annotations

import csv
import io
import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubernetes import client
from kubernetes import config as kube_config

from tests.infra.kubeconfig import TokenUser, token_auth_file, write_kubeconfig
from tests.infra.pki import ControlPlanePki, write_control_plane_pki


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> ControlPlanePki:
    return write_control_plane_pki(tmp_path_factory.mktemp("pki"), service_ip="10.0.0.1")


def _handshake(pki: ControlPlanePki, server_hostname: str) -> str:
    """TLS-connect to a server using the serving cert; return the peer's CN (raises on verification failure)."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki.serving_cert, pki.serving_key)
    client_ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                tls.recv(1)
        except (ssl.SSLError, OSError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
            client_ctx.wrap_socket(raw, server_hostname=server_hostname) as tls,
        ):
            subject = dict(item[0] for item in tls.getpeercert()["subject"])  # type: ignore[index, misc]
            tls.sendall(b"x")
            return str(subject["commonName"])
    finally:
        thread.join(timeout=10)
        listener.close()


@pytest.mark.parametrize("name", ["127.0.0.1", "localhost", "kubernetes.default.svc"])
def test_serving_cert_verifies_against_the_ca(pki: ControlPlanePki, name: str) -> None:
    assert _handshake(pki, name) == "kube-apiserver"


def test_serving_cert_does_not_verify_for_other_names(pki: ControlPlanePki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError):
        _handshake(pki, "example.com")


def test_serving_cert_covers_the_kubernetes_service_ip(pki: ControlPlanePki) -> None:
    cert = x509.load_pem_x509_certificate(pki.serving_cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.0.0.1"}


def test_service_account_keys_are_a_pair(pki: ControlPlanePki) -> None:
    private = serialization.load_pem_private_key(pki.sa_private_key.read_bytes(), password=None)
    public = serialization.load_pem_public_key(pki.sa_public_key.read_bytes())
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert pki.sa_private_key.stat().st_mode & 0o077 == 0


def test_token_auth_file_quotes_multiple_groups() -> None:
    users = [TokenUser.new("admin", ("system:masters", "team")), TokenUser.new("nobody")]
    rows = list(csv.reader(io.StringIO(token_auth_file(users))))
    assert rows[0] == [users[0].token, "admin", "uid-admin", "system:masters,team"]
    assert rows[1] == [users[1].token, "nobody", "uid-nobody"]
    assert users[0].token != users[1].token


def test_kubeconfig_loads_with_the_kubernetes_client(tmp_path: Path, pki: ControlPlanePki) -> None:
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:6443", pki.ca_cert, "s3cr3t", user="someone")
    configuration = client.Configuration()
    kube_config.load_kube_config(config_file=str(path), client_configuration=configuration)
    assert configuration.host == "https://127.0.0.1:6443"
    assert configuration.api_key == {"authorization": "Bearer s3cr3t"}
    assert Path(configuration.ssl_ca_cert).read_bytes() == pki.ca_cert.read_bytes()
