"""The SIGTERM handler survives a second signal that lands while it runs.

Python runs a signal's handler between two bytecodes of the main thread, and a signal that arrives meanwhile runs
its handler inside the first one. In a multi-rank pod each rank gets the container's SIGTERM and, microseconds later,
the supervisor's forwarded copy; on a loaded machine the copy lands inside the first handler often enough. The
handler used to set a threading.Event: the nested call waited for the Event's lock that its outer call held, and the
rank hung until SIGKILL (the multi-rank e2e failed about once in twenty runs). The test makes the second signal land
at every Python call the handler makes, deterministically.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.unit

NESTED = textwrap.dedent(
    """
    import signal, sys
    from dreambooth_trainer.preemption import Preemption

    p = Preemption().install()
    handler = signal.getsignal(signal.SIGTERM)
    inside = [0]
    raised = set()

    def second_signal_at_every_call(frame, event, arg):
        # While the first handler runs: at each function it calls (the first time), the forwarded copy arrives.
        if event == "call" and inside[0] == 1 and frame.f_code not in raised:
            raised.add(frame.f_code)
            signal.raise_signal(signal.SIGTERM)
        return None

    def first(signum, frame):
        inside[0] += 1
        try:
            handler(signum, frame)
        finally:
            inside[0] -= 1

    signal.signal(signal.SIGTERM, first)
    sys.settrace(second_signal_at_every_call)
    signal.raise_signal(signal.SIGTERM)
    sys.settrace(None)
    print("requested" if p.requested else "not requested", p.signal_name, len(raised) > 0, flush=True)
    """
)


def test_a_signal_inside_the_sigterm_handler_does_not_deadlock_it() -> None:
    done = subprocess.run([sys.executable, "-c", NESTED], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["requested", "SIGTERM", "True"]
