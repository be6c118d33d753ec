"""`dreambooth-operator`: run the operator (all kopf settings live in the one startup handler below).

Configuration comes from the environment (``DREAMBOOTH_OPERATOR_*``, see settings.py); the few flags below
override it for local runs: ``dreambooth-operator --standalone --namespace team-a --log-format plain``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
from typing import Any

import kopf

from dreambooth_operator import handlers
from dreambooth_operator.kube import FIELD_MANAGER, load_api_client
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings, peering_priority

LOG_FORMATS = {"json": kopf.LogFormat.JSON, "plain": kopf.LogFormat.PLAIN, "full": kopf.LogFormat.FULL}


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Every kopf setting the operator changes, with why; and the shared state the handlers use."""
    ours: OperatorSettings = memo.get("settings") or OperatorSettings()

    # Peering: with several replicas only the highest-priority one handles objects. Without the peering CRD
    # (or with --standalone) kopf runs alone; `mandatory` stays False so a missing CRD only logs a warning.
    # The priority comes from kopf.operator() in main(): drawn once per process when configured as -1.
    settings.peering.name = ours.peering_name
    settings.peering.standalone = ours.standalone
    settings.peering.mandatory = False

    # Watches: the API server ends each watch after server_timeout (kopf re-lists and resumes); the client
    # timeout catches connections that died silently (no TCP reset, e.g. through a load balancer).
    settings.watching.server_timeout = ours.watch_server_timeout_seconds
    settings.watching.client_timeout = ours.watch_client_timeout_seconds
    settings.watching.connect_timeout = ours.connect_timeout_seconds
    # Pause between consecutive watch requests of one resource: 1 s instead of 0.1 s, so that a failing
    # API server is not flooded by four watches re-connecting in a tight loop.
    settings.watching.reconnect_backoff = 1.0

    # Every non-watch request (including kopf's own patches and events).
    settings.networking.request_timeout = ours.request_timeout_seconds
    settings.networking.connect_timeout = ours.connect_timeout_seconds

    # Events: post Normal events too (kopf's default posts only from INFO level, which we keep), and never
    # let an event storm block the handlers.
    settings.posting.level = logging.INFO
    settings.posting.enabled = True

    # Kopf's own bookkeeping annotations use our group's prefix instead of kopf.zalando.org. We use no
    # on.create/update handlers, so this only matters for daemons' and kopf's internal markers.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="kopf.dreambooth.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="kopf.dreambooth.dev", key="last-handled-configuration"
    )
    # Our finalizer name (kopf adds it so that daemons stop cleanly before the object goes).
    settings.persistence.finalizer = "dreambooth.dev/operator"

    # Sync handlers (the index and wake-up functions) are tiny; a small pool is enough.
    settings.execution.max_workers = 8

    # Batching of watch events per object: react within 0.1 s of the last event (default 0.1 s), and keep
    # a worker for an idle object for 5 s (default) before releasing it.
    settings.batching.batch_window = 0.1

    # Daemons: give our reconcile loop time to finish the current write when the operator stops.
    settings.process.ultimate_exiting_timeout = 30.0

    api = load_api_client(ours.request_timeout_seconds)
    api.user_agent = f"{FIELD_MANAGER}/{api.user_agent}"
    metrics = OperatorMetrics()
    if ours.metrics_port:
        metrics.serve(ours.metrics_port, ours.bind_address)
    memo["state"] = handlers.OperatorState(
        settings=ours,
        api=api,
        metrics=metrics,
        poller=ProgressPoller(
            ours.progress_concurrency, ours.progress_timeout_seconds, ours.reconcile_interval_seconds
        ),
    )
    logger.info(
        "dreambooth-operator configured: namespaces=%s standalone=%s priority=%s metrics_port=%s",
        ours.namespaces or "all",
        ours.standalone,
        settings.peering.priority,
        ours.metrics_port,
    )


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    state = memo.get("state")
    if isinstance(state, handlers.OperatorState):
        await state.poller.close()
        state.api.close()


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
