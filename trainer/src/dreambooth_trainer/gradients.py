"""Gradient clipping that works with every optimizer and precision the trainer uses."""

from __future__ import annotations

from typing import Any

import torch


def clip_gradients(fabric: Any, model: Any, optimizer: Any, scaler: Any, max_norm: float) -> None:
    """Clip the gradients' global norm to `max_norm` (`scaler`: the fp16 GradScaler, else None)."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if scaler is not None and getattr(inner, "_step_supports_amp_scaling", False):
        # fp16 with fused AdamW: Fabric refuses to unscale for optimizers that unscale themselves, but
        # GradScaler supports it (its step() then skips unscaling); found on an H200.
        scaler.unscale_(inner)
        params = [p for g in inner.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        # A non-finite norm (a NaN loss, an fp16 overflow the scaler then skips) is no error here: a diverged
        # run is stopped by the non-finite loss count (`maxNonFiniteLossSteps`), as a failure for good.
        fabric.clip_gradients(model, optimizer, max_norm=max_norm, error_if_nonfinite=False)
