"""`dreambooth-operator`: run the operator (all kopf settings live in the one startup handler, handlers/startup.py).

Configuration comes from the environment (``DREAMBOOTH_OPERATOR_*``, see settings.py); the few flags below
override it for local runs: ``dreambooth-operator --standalone --namespace team-a --log-format plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
from typing import Any

import kopf

import dreambooth_operator.handlers  # noqa: F401 - importing the package registers every kopf handler
from dreambooth_operator.settings import OperatorSettings, peering_priority

LOG_FORMATS = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}


def parse_args(argv: list[str] | None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="dreambooth-operator", description=__doc__)
    parser.add_argument("--standalone", action="store_true", default=None, help="run without peering")
    parser.add_argument("-n", "--namespace", action="append", dest="namespaces", help="watch this namespace")
    parser.add_argument("--log-format", choices=sorted(LOG_FORMATS), help="json (default) or plain")
    parser.add_argument("--verbose", action="store_true", default=None, help="debug logging")
    parser.add_argument("--metrics-port", type=int, help="port of /metrics (0 turns it off)")
    parser.add_argument("--health-port", type=int, help="port of the liveness endpoint /healthz (0 turns it off)")
    args = vars(parser.parse_args(argv))
    return {k: v for k, v in args.items() if v is not None}


def main(argv: list[str] | None = None) -> None:
    settings = OperatorSettings(**parse_args(argv))
    kopf.configure(verbose=settings.verbose, log_format=LOG_FORMATS[settings.log_format])
    liveness = f"http://{settings.bind_address}:{settings.health_port}/healthz" if settings.health_port else None
    asyncio.run(
        kopf.operator(
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            standalone=settings.standalone,
            priority=peering_priority(settings.priority, secrets.SystemRandom().randint),
            peering_name=settings.peering_name,
            liveness_endpoint=liveness,
            memo=kopf.Memo(settings=settings),
        )
    )


if __name__ == "__main__":
    main()
