"""The local-rank supervisor (launcher.py): exit-code rules, rank environments, signal forwarding and the
failure path, with small Python children standing in for the ranks (the real trainer runs under it in
tests/integration/test_trainer_distributed.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dreambooth_trainer.distributed import read_env
from dreambooth_trainer.launcher import failure_message, overall_exit, rank_envs


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([0, 0], 0),
        ([12, 12], 12),
        ([12, 0], 12),
        ([10, -9], 10),  # the first failure is the cause; the peer was killed after it
        ([-9, 10], 11),  # a rank killed by a signal (e.g. the OOM killer) is retryable
        ([12, 11], 11),
        ([0, 10, 12], 10),
    ],
)
def test_overall_exit(codes: list[int], expected: int) -> None:
    assert overall_exit(codes) == expected


def test_failure_message_names_the_first_failed_rank() -> None:
    assert failure_message([(0, 12), (1, 12)]) is None
    assert failure_message([(0, 12), (1, -9), (2, 11)]) == "local rank 1 was killed by SIGKILL"
    assert failure_message([(1, 10)]) == "local rank 1 exited with code 10"


def test_rank_envs() -> None:
    dist = read_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "h0"})
    envs = rank_envs(dist, {"KEEP": "1"})
    assert [(e["LOCAL_RANK"], e["RANK"]) for e in envs] == [("0", "2"), ("1", "3")]
    for e in envs:
        assert e["KEEP"] == "1"
        assert (e["WORLD_SIZE"], e["NODE_RANK"], e["LOCAL_WORLD_SIZE"], e["MASTER_ADDR"]) == ("4", "1", "2", "h0")


# A rank stand-in: says it is ready, then on SIGTERM "checkpoints" (rank 0 slowly) and exits 12; with FAIL set to
# its rank it exits 10 at once, and with HANG it ignores SIGTERM and never ends.
RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    rank, out = os.environ["LOCAL_RANK"], Path(os.environ["OUT"])
    if os.environ.get("FAIL") == rank:
        sys.exit(10)
    stop = []
    signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("HANG") else (lambda *_: stop.append(1)))
    (out / f"ready-{rank}").write_text(os.environ["RANK"])
    while not stop:
        time.sleep(0.05)
    time.sleep(1.5 if rank == "0" else 0.1)
    (out / f"checkpointed-{rank}").touch()
    sys.exit(12)
    """
)
SUPERVISOR = textwrap.dedent(
    """
    import os, sys
    from dreambooth_trainer.distributed import read_env
    from dreambooth_trainer.launcher import Supervisor, rank_envs
    dist = read_env()
    envs = rank_envs(dist, os.environ)
    sys.exit(Supervisor([[sys.executable, "-c", sys.argv[1]]] * dist.procs_per_node, envs, failure_grace=0.5).run())
    """
)


def _supervisor(tmp_path: Path, **env: str) -> subprocess.Popen[str]:
    full = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "OUT": str(tmp_path), **env}
    return subprocess.Popen([sys.executable, "-c", SUPERVISOR, RANK], env=full, text=True)


def _wait_ready(tmp_path: Path, proc: subprocess.Popen[str], ranks: int = 2) -> None:
    import time

    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("ready-*"))) < ranks:
        assert proc.poll() is None, f"supervisor exited {proc.returncode}"
        assert time.monotonic() < deadline, "ranks did not start"
        time.sleep(0.05)


def test_sigterm_to_the_supervisor_alone_reaches_every_rank_and_rank0_may_finish(tmp_path: Path) -> None:
    proc = _supervisor(tmp_path)
    _wait_ready(tmp_path, proc)
    os.kill(proc.pid, signal.SIGTERM)  # as the kubelet does: the container's first process only
    assert proc.wait(timeout=60) == 12
    # rank 1 exited 12 long before rank 0 finished "checkpointing", and rank 0 was not killed for it
    assert (tmp_path / "checkpointed-0").exists()
    assert (tmp_path / "checkpointed-1").exists()


def test_a_failed_rank_fails_the_pod_with_its_code_and_the_hung_peer_is_killed(tmp_path: Path) -> None:
    proc = _supervisor(tmp_path, FAIL="1", HANG="1")
    _wait_ready(tmp_path, proc, ranks=1)
    assert proc.wait(timeout=60) == 10
    assert not (tmp_path / "checkpointed-0").exists()


STUCK_RANK = textwrap.dedent(
    """
    import faulthandler, os, signal, sys, time
    from pathlib import Path
    from dreambooth_trainer.preemption import STACK_DUMP_SIGNAL
    out = Path(os.environ["OUT"])
    rank = os.environ["LOCAL_RANK"]
    # Each rank's own file (in a pod they share the container's stderr); what the rank registers is the real call.
    faulthandler.register(STACK_DUMP_SIGNAL, file=open(out / f"stderr-{rank}", "w"), all_threads=True)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as a rank stuck in a collective: its handler never runs
    (out / f"ready-{rank}").write_text("")
    def stuck_in_a_collective():
        time.sleep(120)
    stuck_in_a_collective()
    """
)
DUMPING_SUPERVISOR = textwrap.dedent(
    """
    import os, sys
    from dreambooth_trainer.distributed import read_env
    from dreambooth_trainer.launcher import Supervisor, rank_envs
    dist = read_env()
    envs = rank_envs(dist, os.environ)
    sys.exit(Supervisor([[sys.executable, "-c", sys.argv[1]]] * dist.procs_per_node, envs, dump_after=0.5).run())
    """
)


def test_a_rank_still_running_late_in_the_grace_period_dumps_its_stacks(tmp_path: Path) -> None:
    import time

    full = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "OUT": str(tmp_path)}
    # Its own process group, so that the stuck ranks go with it at the end.
    proc = subprocess.Popen([sys.executable, "-c", DUMPING_SUPERVISOR, STUCK_RANK], env=full, start_new_session=True)
    try:
        _wait_ready(tmp_path, proc)  # type: ignore[arg-type]
        os.kill(proc.pid, signal.SIGTERM)  # forwarded; ignored by both ranks
        dumps = [tmp_path / f"stderr-{rank}" for rank in (0, 1)]
        deadline = time.monotonic() + 60
        while not all("in stuck_in_a_collective" in f.read_text() for f in dumps):
            assert proc.poll() is None, f"supervisor exited {proc.returncode}"
            assert time.monotonic() < deadline, [f.read_text() for f in dumps]
            time.sleep(0.05)
        for f in dumps:  # the main thread's stack, as faulthandler writes it
            assert "most recent call first" in f.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as the kubelet does at the end of the grace period, to every process
        proc.wait(timeout=30)


TEARING_DOWN_RANK = textwrap.dedent(
    """
    import os, signal, sys, time
    from pathlib import Path
    out = Path(os.environ["OUT"])
    rank = os.environ["LOCAL_RANK"]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    (out / f"ready-{rank}").write_text("")
    while not stop:
        time.sleep(0.05)
    # Preempted and done, but slow to leave (the interpreter's teardown): no stack-dump handler any more.
    time.sleep(2.0)
    sys.exit(12)
    """
)


def test_the_stack_dump_signal_does_not_kill_a_rank_without_the_handler(tmp_path: Path) -> None:
    """A rank past its result has no faulthandler any more; the late-rank dump must leave it to exit 12 (SIGUSR2
    killed it: the pod exited 11, a failure, instead of 12)."""
    full = {**os.environ, "PET_NNODES": "1", "PET_NPROC_PER_NODE": "2", "OUT": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-c", DUMPING_SUPERVISOR, TEARING_DOWN_RANK], env=full, text=True)
    _wait_ready(tmp_path, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 12


EXITING_NOW = textwrap.dedent(
    """
    import atexit, sys
    from dreambooth_trainer.cli import exit_now

    class TornDown:
        def __del__(self):
            print("torn down", flush=True)

    kept = TornDown()  # a module global: only the interpreter's teardown would delete it
    atexit.register(lambda: print("atexit ran", flush=True))
    sys.stdout.write("result written")  # unflushed: exit_now flushes it
    exit_now(12)
    """
)


def test_exit_now_runs_atexit_and_flushes_but_skips_the_teardown() -> None:
    done = subprocess.run([sys.executable, "-c", EXITING_NOW], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 12, done.stderr
    assert "result written" in done.stdout
    assert "atexit ran" in done.stdout
    assert "torn down" not in done.stdout
