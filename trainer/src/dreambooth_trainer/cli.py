"""`dreambooth-train [--config FILE] [--local]`: run one training job and exit with its exit code.

The config comes from FILE or `env.CONFIG` (docs/contracts.md). Log lines are JSON on stdout. The outcome
goes to the termination message (`TERMINATION_MESSAGE_PATH`) and, when the output location is reachable, to
`<output.uri>/result.json`. Exit codes (exitcodes.py): 0 success, 10 invalid input, 11 retryable, 12 preempted.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import faulthandler
import os
import sys
import traceback
from pathlib import Path
from typing import Any, NoReturn

from dreambooth_api import env
from dreambooth_api.config import ConfigError, JobConfig, load_job_config
from dreambooth_api.exitcodes import ExitCode, TrainerError
from dreambooth_trainer.lean_imports import keep_out, unused_packages
from dreambooth_trainer.logging import log
from dreambooth_trainer.preemption import STACK_DUMP_SIGNAL, Preemption
from dreambooth_trainer.result import RunResult, write_termination_message

EXIT_BY_STATUS = {"succeeded": ExitCode.SUCCESS, "preempted": ExitCode.PREEMPTED}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dreambooth-train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, help=f"a JobConfig JSON/YAML file (default: ${env.CONFIG})")
    p.add_argument(
        "--local",
        action="store_true",
        help="one process on this machine: ignore PET_*/WORLD_SIZE, serve progress on 127.0.0.1, "
        "termination message to <workdir>/termination-log unless TERMINATION_MESSAGE_PATH is set",
    )
    p.add_argument("--workdir", type=Path, help=f"local scratch folder (default: ${env.WORKDIR} or ./.dreambooth)")
    p.add_argument(
        "--preflight",
        action="store_true",
        help="only check the input on this CPU (buckets, images, output, base model) and exit: preflight.py",
    )
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="only evaluate the job's exported model again (spec.evaluation) and exit: evaluation/rerun.py",
    )
    return p.parse_args(argv)


def classify(err: BaseException) -> tuple[ExitCode, str]:
    """The exit code and condition reason of an error."""
    if isinstance(err, ConfigError):
        return ExitCode.INVALID_INPUT, "InvalidInput"
    if isinstance(err, TrainerError):
        return err.exit_code, err.reason
    try:
        from botocore.exceptions import BotoCoreError, EndpointConnectionError
        from botocore.exceptions import ConnectionError as BotoConnectionError
    except ImportError:  # pragma: no cover - botocore is a dependency
        return ExitCode.RETRYABLE, "TrainingError"
    if isinstance(err, BotoConnectionError | EndpointConnectionError | BotoCoreError):
        return ExitCode.RETRYABLE, "StorageUnavailable"
    if _is_collective_failure(err):
        return ExitCode.RETRYABLE, "CollectiveFailure"
    return ExitCode.RETRYABLE, "TrainingError"


def _is_collective_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__}: {err}".lower()
    return any(s in text for s in ("gloo", "nccl", "distbackenderror", "connection reset", "broken pipe"))


def _write_result(config: JobConfig | None, doc: dict[str, Any], is_main: bool) -> None:
    if not is_main:
        return
    write_termination_message(doc)
    if config is None:
        return
    try:
        import json

        from dreambooth_trainer.storage import ObjectStore, join_uri

        ObjectStore(config.storage).write_bytes(join_uri(config.output.uri, "result.json"), json.dumps(doc).encode())
    except Exception as err:
        log.warning("result_upload_failed", error=str(err))


def _procs_per_node(local: bool) -> int:
    """How many local ranks this process must start and supervise (launcher.py); 1 when it is a rank itself."""
    if local or "LOCAL_RANK" in os.environ:
        return 1
    from dreambooth_trainer.distributed import read_env

    try:
        return read_env().procs_per_node
    except TrainerError:
        return 1  # the run below reports the bad setting with its exit code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preflight:
        from dreambooth_trainer.preflight import run_preflight

        return run_preflight(args.config)
    if args.evaluate:
        from dreambooth_trainer.evaluation.rerun import main_stored

        return main_stored(args.config, args.workdir)
    workdir = args.workdir or (Path(os.environ[env.WORKDIR]) if os.environ.get(env.WORKDIR) else None)
    if args.local and not os.environ.get("TERMINATION_MESSAGE_PATH"):
        base = workdir or Path.cwd() / ".dreambooth"
        base.mkdir(parents=True, exist_ok=True)
        os.environ["TERMINATION_MESSAGE_PATH"] = str(base / "termination-log")
    # Ranks other than 0 only log; rank 0 owns the termination message and result.json.
    is_main = os.environ.get("LOCAL_RANK", "0") == "0" and (
        args.local or os.environ.get(env.PET_NODE_RANK, os.environ.get("NODE_RANK", "0")) == "0"
    )
    procs = _procs_per_node(args.local)
    if procs > 1:
        from dreambooth_trainer.distributed import read_env
        from dreambooth_trainer.launcher import supervise

        return supervise(sys.argv[1:] if argv is None else argv, read_env(), is_main=is_main)
    # A rank's stacks on demand (the launcher asks when a rank outlives most of a preemption's grace period).
    faulthandler.register(STACK_DUMP_SIGNAL, all_threads=True)
    config: JobConfig | None = None
    with Preemption() as preemption:
        try:
            config = load_job_config(args.config)
            log.bind(job=config.name)
            keep_out(unused_packages(config))
            from dreambooth_trainer.job import run_job  # after keep_out: it imports the model stack

            status, doc = run_job(config, preemption=preemption, log=log, workdir=workdir, local=args.local)
        except Exception as err:
            code, reason = classify(err)
            message = str(err) or type(err).__name__
            log.error(
                "failed",
                reason=reason,
                message=message,
                exitCode=int(code),
                traceback=traceback.format_exception(err)[-3:] if code is not ExitCode.INVALID_INPUT else None,
            )
            status = "preempted" if code is ExitCode.PREEMPTED else "failed"
            doc = RunResult(status=status, reason=reason, message=message).to_wire()
            # The output belongs to another run: its result.json stays; the termination message still says why.
            _write_result(None if getattr(err, "foreign_output", False) else config, doc, is_main)
            return int(code)
    _write_result(config, doc, is_main)
    code = EXIT_BY_STATUS.get(status, ExitCode.RETRYABLE)
    log.info("finished", status=status, exitCode=int(code), **{k: v for k, v in doc.items() if k != "status"})
    return int(code)


def run() -> None:
    """The `dreambooth-train` command (and each local rank's process): `main`, then `exit_now`."""
    exit_now(main())


def exit_now(code: int) -> NoReturn:
    """End the process with `code` once the atexit handlers have run and stdout/stderr are flushed, without the
    interpreter's teardown. That teardown is a full garbage collection over the model stack's objects and the
    clearing of every module: 5 to 15 s with the tiny model on two loaded cores, after the result is written, taken
    from a preemption's grace period (a rank still tearing down when SIGKILL comes turns the pod's exit 12 into 137)
    and added to every job's time to its model. Nothing is left to do by then: the result, the termination message
    and the checkpoints are written, the process group is gone (`distributed.leave`), and the threads of an upload
    abandoned at a preemption are exactly what must not be waited for."""
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
