"""Suspend policy: spec.runPolicy.suspend <-> the batch Job's spec.suspend.

Suspending sets the batch Job's suspend: the Job controller deletes the pods, which get SIGTERM and write a
checkpoint. Resuming unsuspends it, and the new pods resume from that checkpoint. A job queued by Kueue is
created suspended and is unsuspended by Kueue (admission), never by the operator.
"""

from __future__ import annotations


def desired_batch_suspend(user_suspend: bool, batch_suspended: bool, queued_by_kueue: bool) -> bool | None:
    """The value to write to the batch Job's spec.suspend, or None to leave it as it is."""
    if user_suspend and not batch_suspended:
        return True
    if not user_suspend and batch_suspended and not queued_by_kueue:
        return False
    return None


def waiting_for_admission(user_suspend: bool, batch_suspended: bool, queued_by_kueue: bool) -> bool:
    """Suspended by a queue rather than by the user: the job is Queued."""
    return batch_suspended and queued_by_kueue and not user_suspend
