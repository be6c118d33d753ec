"""Static bearer tokens for the test control plane and kubeconfig files that use them."""

from __future__ import annotations

import csv
import io
import json
import secrets
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TokenUser:
    """One line of kube-apiserver's `--token-auth-file`: token, user name, uid, groups."""

    name: str
    uid: str
    groups: tuple[str, ...] = ()
    token: str = ""

    @classmethod
    def new(cls, name: str, groups: tuple[str, ...] = ()) -> TokenUser:
        return cls(name=name, uid=f"uid-{name}", groups=groups, token=secrets.token_hex(24))


def token_auth_file(users: list[TokenUser]) -> str:
    """CSV content for `--token-auth-file` (groups are one quoted, comma-separated field)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
    for user in users:
        row = [user.token, user.name, user.uid]
        if user.groups:
            row.append(",".join(user.groups))
        writer.writerow(row)
    return buf.getvalue()


def kubeconfig(server: str, ca_file: Path, token: str, *, user: str, context: str = "test") -> str:
    """A kubeconfig (JSON, which is valid YAML) for `server` authenticating with a bearer token."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "test", "cluster": {"server": server, "certificate-authority": str(ca_file)}}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": "test", "user": user}}],
        "current-context": context,
        "preferences": {},
    }
    return json.dumps(config, indent=2) + "\n"


def write_kubeconfig(path: Path, server: str, ca_file: Path, token: str, *, user: str) -> Path:
    """Write `kubeconfig(...)` to `path` (mode 0600) and return the path."""
    path.write_text(kubeconfig(server, ca_file, token, user=user))
    path.chmod(0o600)
    return path
