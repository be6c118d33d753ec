"""The startup and cleanup handlers: every kopf setting the operator changes (with why), and the shared state.

Configuration comes from the environment (``DREAMBOOTH_OPERATOR_*``, settings.py) and the command line (main.py),
which passes its OperatorSettings in kopf's memo.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from dreambooth_operator.handlers.state import OperatorState
from dreambooth_operator.kube import load_api_client
from dreambooth_operator.layout import FIELD_MANAGER
from dreambooth_operator.metrics import OperatorMetrics
from dreambooth_operator.progress import ProgressPoller
from dreambooth_operator.settings import OperatorSettings


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Every kopf setting the operator changes, with why; and the shared state the handlers use."""
    ours: OperatorSettings = memo.get("settings") or OperatorSettings()

    # Peering: with several replicas only the highest-priority one handles objects. `mandatory` (the chart sets it
    # with more than one replica): without the peering CRD kopf pauses every watch instead of running as if alone,
    # since replicas that cannot see each other's records would all act on every object. Off (kopf.operator() turns
    # it on whenever a peering name is given; one replica, or a local run): a missing CRD only logs a warning.
    # --standalone turns peering off. The priority comes from kopf.operator() in main(): drawn once per process
    # when configured as -1.
    settings.peering.name = ours.peering_name
    settings.peering.standalone = ours.standalone
    settings.peering.mandatory = ours.peering_mandatory and not ours.standalone

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

    # Events: the operator posts its own, one per transition (kopf.event, which only `enabled` gates). kopf's own
    # log lines become events only from WARNING up (a failing handler), so that "Daemon 'job_loop' succeeded." and
    # similar INFO lines never reach `kubectl describe`.
    settings.posting.level = logging.WARNING
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

    # The reconciles' blocking API calls (asyncio.to_thread) run on the loop's default executor: one thread per
    # kept-alive API connection, instead of asyncio's 4 + CPUs threads (6 on 2 cores).
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=ours.api_threads, thread_name_prefix="dreambooth-api")
    )
    api = load_api_client(ours.request_timeout_seconds, ours.api_retries, connections=ours.api_threads)
    api.user_agent = f"{FIELD_MANAGER}/{api.user_agent}"
    metrics = OperatorMetrics()
    if ours.metrics_port:
        metrics.serve(ours.metrics_port, ours.bind_address)
    memo["state"] = OperatorState(
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
    if isinstance(state, OperatorState):
        await state.poller.close()
        state.api.close()
