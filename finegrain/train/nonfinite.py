"""The NaN/inf policy of a training step (``train.nan_policy``).

A non-finite loss or gradient is detected on any rank and agreed by all (one all-reduce), so
every rank takes the same branch. ``stop`` raises ``NonFiniteLossError`` naming the step and
the loss terms (or the parameters whose gradient is non-finite); ``skip`` drops the update and
the trainer counts it. fp16 runs leave gradient checks to ``GradScaler``.
"""

from __future__ import annotations

import math

import torch

from finegrain.outputs import MethodOutput
from finegrain.train import distributed as dist_utils
from finegrain.train import guard


class NonFiniteLossError(ValueError):
    """Raised under ``train.nan_policy=stop``; the message names the step and loss terms."""


def loss_finite(out: MethodOutput, step: int, policy: str, device: torch.device) -> bool:
    """Whether ``out.loss`` is finite on every rank (collective); ``step`` is the one being
    taken (1-based). Raises under ``policy == "stop"``."""
    bad = 0.0 if bool(torch.isfinite(out.loss.detach()).item()) else 1.0
    bad = dist_utils.all_reduce_max(bad, device)  # every rank takes the same branch
    if bad == 0.0:
        return True
    if policy == "stop":
        values = {k: float(v.detach().float()) for k, v in out.losses.items()}
        names = [k for k, v in values.items() if not math.isfinite(v)]
        terms = ", ".join(f"{k}={v:.4g}" for k, v in values.items())
        raise NonFiniteLossError(
            f"non-finite loss at step {step}: loss={float(out.loss.detach().float())}"
            f"{', ' + terms if terms else ''}{'; non-finite: ' + ', '.join(names) if names else ''}"
            " (set train.nan_policy=skip to skip such steps)"
        )
    return False


def grads_finite(
    params: list[torch.nn.Parameter],
    method: torch.nn.Module,
    step: int,
    policy: str,
    device: torch.device,
) -> bool:
    """Whether every gradient is finite on every rank (collective); under ``policy == "stop"``
    a non-finite one raises naming the parameters and the step."""
    ok = guard.grads_finite(params)
    if dist_utils.all_reduce_max(0.0 if ok else 1.0, device) == 0.0:
        return True
    if policy == "stop":
        bad = guard.nonfinite_grads(method)
        where = f" in {', '.join(bad[:3])}{f' (+{len(bad) - 3} more)' if len(bad) > 3 else ''}"
        raise NonFiniteLossError(
            f"non-finite gradient at step {step}{where if bad else ' on another rank'}"
            " with a finite loss (set train.nan_policy=skip to skip such steps)"
        )
    return False
