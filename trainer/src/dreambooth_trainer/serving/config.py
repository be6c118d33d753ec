"""What `dreambooth-serve` starts from: the config document the operator sets (`env.SERVE_CONFIG`), command-line
flags on top of it, and the bearer token (`env.SERVE_TOKEN`).

    dreambooth-serve                                   # the operator's way: everything from the environment
    dreambooth-serve --model-uri s3://b/models/dog/model --adapter-prefix s3://b/models/ --port 8080
    dreambooth-serve --base-model tiny --adapter dog=file:///tmp/dog/lora --adapter cat=s3://b/cat/lora
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from dreambooth_api import env
from dreambooth_api.exitcodes import InvalidInputError
from dreambooth_api.serving import ServeConfig


@dataclass(frozen=True)
class Launch:
    """The resolved start-up settings: the config, where to listen, and the token (None: no auth)."""

    config: ServeConfig
    host: str
    port: int
    workdir: Path | None
    token: str | None


def load_serve_config(raw: str | None = None) -> ServeConfig:
    """The config document: JSON or YAML text, or the path of a file holding it (`env.SERVE_CONFIG` by default)."""
    text = raw if raw is not None else os.environ.get(env.SERVE_CONFIG, "")
    if not text.strip():
        raise InvalidInputError(f"no server config: set {env.SERVE_CONFIG} or pass --model-uri/--base-model")
    return _validated(_parse(text))


def _parse(text: str) -> Any:
    stripped = text.strip()
    if not stripped.startswith("{") and Path(stripped).is_file():
        text = Path(stripped).read_text()
    try:
        return json.loads(text) if text.lstrip().startswith("{") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        raise InvalidInputError(f"invalid server config: {err}") from err


def _validated(data: Any) -> ServeConfig:
    try:
        config = ServeConfig.model_validate(data)
    except ValidationError as err:
        raise InvalidInputError(f"invalid server config: {err}") from err
    if config.model_uri is None and config.base_model is None:
        raise InvalidInputError("server config needs modelUri or baseModel")
    return config


def read_token(environ: Mapping[str, str]) -> str | None:
    """The bearer token: None when `env.SERVE_TOKEN` is unset (no auth); an empty value is an error, never
    "auth off" (an empty key in the auth Secret must not open the server)."""
    if env.SERVE_TOKEN not in environ:
        return None
    token = environ[env.SERVE_TOKEN].strip()
    if not token:
        raise InvalidInputError(
            f"{env.SERVE_TOKEN} is set but empty (an empty key in the auth Secret?): refusing to serve without auth;"
            " put a token in the Secret, or remove spec.auth to serve without one"
        )
    return token


def base_model_spec(value: str) -> dict[str, Any]:
    """`--base-model`: `tiny`, an s3:// or file:// diffusers folder, or a hub id."""
    if value == "tiny":
        return {"tiny": True}
    if value.startswith(("s3://", "file://")):
        return {"uri": value}
    return {"id": value}


def adapter_flag(value: str) -> dict[str, Any]:
    """`--adapter NAME=URI` or `NAME=URI@WEIGHT`."""
    name, sep, rest = value.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--adapter takes NAME=URI[@WEIGHT], not {value!r}")
    uri, at, weight = rest.rpartition("@")
    adapter: dict[str, Any] = {"name": name, "uri": uri if at else rest}
    if at:
        try:
            adapter["weight"] = float(weight)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"--adapter weight must be a number, not {weight!r}") from err
    return adapter


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dreambooth-serve",
        description="An OpenAI-compatible image server (POST /v1/images/generations) for DreamBooth models and LoRA "
        f"subjects. Without flags it reads {env.SERVE_CONFIG}; flags override its fields.",
    )
    p.add_argument("--model-uri", help="a diffusers folder, a single-file checkpoint or LoRA weights (s3://, file://)")
    p.add_argument("--base-model", type=base_model_spec, help="tiny, a hub id, or a diffusers folder URI")
    p.add_argument("--model-name", help="the base model's name in /v1/models and a request's model")
    p.add_argument("--adapter", type=adapter_flag, action="append", default=[], help="NAME=URI[@WEIGHT] (repeatable)")
    p.add_argument("--adapter-prefix", help="every <prefix>/<name>/lora/ export is the subject <name>")
    p.add_argument("--subjects-file", help="a JSON file {name: LoRA URI}, re-read when it changes")
    p.add_argument("--host", help=f"address to bind (default ${env.BIND_ADDRESS}, else 0.0.0.0)")
    p.add_argument("--port", type=int, help=f"port (default ${env.SERVE_PORT}, else {env.SERVE_DEFAULT_PORT})")
    p.add_argument("--workdir", type=Path, help=f"scratch folder (default ${env.WORKDIR}, else a temporary one)")
    p.add_argument("--max-batch-size", type=int, help="images per pipeline call, at most (1: no batching)")
    p.add_argument("--max-batch-delay-ms", type=int, help="how long a batch waits for compatible requests")
    p.add_argument("--max-queued-requests", type=int, help="waiting requests, at most (then 429)")
    return p


def launch(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> Launch:
    """The settings from the environment and `argv`; raises InvalidInputError for a config that cannot start."""
    environ = os.environ if environ is None else environ
    args = parser().parse_args(argv)
    flags_name_model = args.model_uri is not None or args.base_model is not None
    raw = environ.get(env.SERVE_CONFIG, "")
    if not raw.strip() and not flags_name_model:
        raise InvalidInputError(f"no server config: set {env.SERVE_CONFIG} or pass --model-uri/--base-model")
    data: dict[str, Any] = dict(_parse(raw) or {}) if raw.strip() else {}
    if flags_name_model:
        data.pop("modelUri", None)
        data.pop("baseModel", None)
    fields = {
        "modelUri": args.model_uri,
        "baseModel": args.base_model,
        "modelName": args.model_name,
        "adapterPrefix": args.adapter_prefix,
        "subjectsFile": args.subjects_file,
        "adapters": args.adapter or None,
    }
    data |= {k: v for k, v in fields.items() if v is not None}
    limits = {
        "maxBatchSize": args.max_batch_size,
        "maxBatchDelayMs": args.max_batch_delay_ms,
        "maxQueuedRequests": args.max_queued_requests,
    }
    server = dict(data.get("server") or {}) | {k: v for k, v in limits.items() if v is not None}
    if server:
        data["server"] = server
    config = _validated(data)
    host = args.host or environ.get(env.BIND_ADDRESS) or "0.0.0.0"  # noqa: S104 - a pod's server listens everywhere
    port = args.port if args.port is not None else int(environ.get(env.SERVE_PORT) or env.SERVE_DEFAULT_PORT)
    workdir = args.workdir or (Path(environ[env.WORKDIR]) if environ.get(env.WORKDIR) else None)
    return Launch(config, host, port, workdir, read_token(environ))
