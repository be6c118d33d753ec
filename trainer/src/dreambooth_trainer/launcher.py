"""One process per local rank, supervised: what `dreambooth-train` does when `PET_NPROC_PER_NODE` > 1.

A pod with several GPUs runs one rank per GPU. Kubernetes sends SIGTERM to the container's first process only, and
reads one exit code and one termination message from it. Lightning's own launcher makes that first process rank 0
and its other ranks children that never see the SIGTERM; worse, when a child exits non-zero (exit 12 after a
preemption checkpoint, or exit 10 on bad input) its watchdog SIGKILLs every process, rank 0 included, possibly in
the middle of its final checkpoint, and the pod's exit code becomes 137. Here the first process is a supervisor
instead (as torchrun's agent is):

- it starts one `dreambooth-train` child per local rank, with LOCAL_RANK, RANK, LOCAL_WORLD_SIZE, WORLD_SIZE,
  NODE_RANK and MASTER_* set (Lightning then creates no processes of its own);
- it forwards SIGTERM and SIGINT to every child, so each rank's preemption handler runs;
- a child that exits 0 or 12 is left to finish with the others; after any other exit the rest get
  `FAILURE_GRACE_SECONDS` to stop on their own (a peer's failure breaks their collectives) and are then killed;
- a rank still running `dump_after` seconds after a forwarded SIGTERM (near the end of the grace period: a rank
  stuck in a collective never reaches its preemption handler) gets `STACK_DUMP_SIGNAL`, on which each rank's
  faulthandler writes every thread's stack to the pod log, so a hang that ends in SIGKILL leaves its cause behind;
- its exit code is the first failure's (a death by signal counts as retryable, 11), else 12 if any rank was
  preempted, else 0 (`overall_exit`); when the ranks left no termination message it writes one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from dreambooth_api.exitcodes import ExitCode
from dreambooth_trainer.distributed import DistEnv
from dreambooth_trainer.logging import log
from dreambooth_trainer.preemption import EXIT_MARGIN_SECONDS, STACK_DUMP_SIGNAL, grace_seconds
from dreambooth_trainer.result import (
    DEFAULT_TERMINATION_PATH,
    TERMINATION_ENV,
    RunResult,
    write_termination_message,
)

FAILURE_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.2
FORWARDED = (signal.SIGTERM, signal.SIGINT)
# Exit codes that say "this rank finished as it should": the others are left to finish too.
CLEAN = (ExitCode.SUCCESS, ExitCode.PREEMPTED)


def rank_envs(dist: DistEnv, base: Mapping[str, str]) -> list[dict[str, str]]:
    """The environment of each local rank's process."""
    envs = []
    for local in range(dist.procs_per_node):
        env = dict(base)
        env.update(dist.lightning_env())
        env.update(
            {
                "LOCAL_RANK": str(local),
                "RANK": str(dist.node_rank * dist.procs_per_node + local),
                "LOCAL_WORLD_SIZE": str(dist.procs_per_node),
            }
        )
        envs.append(env)
    return envs


def normalise(code: int) -> int:
    """A child's exit status as an exit code: killed by a signal (negative in Popen) is retryable."""
    return int(ExitCode.RETRYABLE) if code < 0 else code


def overall_exit(codes_in_exit_order: Sequence[int]) -> int:
    """The pod's exit code from its ranks' exit codes, in the order they exited."""
    codes = [normalise(c) for c in codes_in_exit_order]
    failures = [c for c in codes if c not in CLEAN]
    if failures:
        return failures[0]
    if ExitCode.PREEMPTED in codes:
        return int(ExitCode.PREEMPTED)
    return int(ExitCode.SUCCESS)


def failure_message(exits: Sequence[tuple[int, int]]) -> str | None:
    """What the first failed rank did, for the termination message; None when no rank failed."""
    for rank, status in exits:
        if normalise(status) not in CLEAN:
            how = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with code {status}"
            return f"local rank {rank} {how}"
    return None


@dataclass
class Supervisor:
    """Runs `commands[i]` with `envs[i]` and supervises them as described in the module docstring."""

    commands: Sequence[Sequence[str]]
    envs: Sequence[Mapping[str, str]]
    failure_grace: float = FAILURE_GRACE_SECONDS
    dump_after: float | None = None
    """Seconds after a forwarded SIGTERM at which ranks still running get STACK_DUMP_SIGNAL (None: never)."""
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    exits: list[tuple[int, int]] = field(default_factory=list)
    """(local rank, exit status) in the order the ranks exited."""
    _pending_signal: int | None = None
    _signalled_at: float | None = None
    _dumped: bool = False

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self._pending_signal = signum
        if self._signalled_at is None:
            self._signalled_at = time.monotonic()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._forward) for sig in FORWARDED}
        try:
            for command, env in zip(self.commands, self.envs, strict=True):
                self.procs.append(subprocess.Popen(list(command), env=dict(env)))
            if self._pending_signal is not None:  # a signal that came while the children were starting
                self._forward(self._pending_signal, None)
            return self._wait()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for proc in self.procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()

    def _reap(self) -> None:
        done = {rank for rank, _ in self.exits}
        for rank, proc in enumerate(self.procs):
            if rank not in done and proc.poll() is not None:
                self.exits.append((rank, proc.returncode))
                log.info("rank_exited", localRank=rank, exitCode=proc.returncode)

    def _wait(self) -> int:
        failed_at: float | None = None
        while len(self.exits) < len(self.procs):
            self._reap()
            self._dump_stacks_when_late()
            if failed_at is None and any(normalise(code) not in CLEAN for _, code in self.exits):
                failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() - failed_at > self.failure_grace:
                for rank, proc in enumerate(self.procs):
                    if proc.poll() is None:
                        log.warning("rank_killed", localRank=rank, reason="a peer rank failed")
                        proc.kill()
                        proc.wait()
                self._reap()
                break
            if len(self.exits) < len(self.procs):
                time.sleep(POLL_SECONDS)
        return overall_exit([code for _, code in self.exits])

    def _dump_stacks_when_late(self) -> None:
        if self._dumped or self.dump_after is None or self._signalled_at is None:
            return
        if time.monotonic() - self._signalled_at < self.dump_after:
            return
        self._dumped = True
        late = [rank for rank, proc in enumerate(self.procs) if proc.poll() is None]
        if late:
            log.warning("rank_stacks_dumped", localRanks=late, secondsSinceSignal=round(self.dump_after, 1))
            for rank in late:
                self.procs[rank].send_signal(STACK_DUMP_SIGNAL)


def supervise(argv: Sequence[str], dist: DistEnv, *, is_main: bool) -> int:
    """Run one `dreambooth-train` child per local rank (same arguments) and return the pod's exit code."""
    command = [sys.executable, "-m", "dreambooth_trainer.cli", *argv]
    log.info("launching_local_ranks", procsPerNode=dist.procs_per_node, nodeRank=dist.node_rank)
    dump_after = max(grace_seconds() - EXIT_MARGIN_SECONDS - 2.0, 1.0)
    supervisor = Supervisor([command] * dist.procs_per_node, rank_envs(dist, os.environ), dump_after=dump_after)
    code = supervisor.run()
    message_path = Path(os.environ.get(TERMINATION_ENV) or DEFAULT_TERMINATION_PATH)
    wrote_nothing = not message_path.is_file() or message_path.stat().st_size == 0
    message = failure_message(supervisor.exits)
    if message is not None and is_main and wrote_nothing:
        write_termination_message(RunResult(status="failed", reason="RankFailed", message=message).to_wire())
    return code
