"""Exponential-moving-average teachers (BYOL, Grill et al. 2020, Sec. 3.1; DINO, Caron et al.
2021, Sec. 3.1): theta_t <- m theta_t + (1 - m) theta_s, with m from ``ema_momentum(step)``.

The teacher is a deep copy of the student modules, never in the optimizer (``requires_grad``
False), kept in eval mode; its parameters AND buffers are part of the method's state dict.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn as nn


def make_teacher(student: nn.Module) -> nn.Module:
    """A frozen, eval-mode copy of ``student`` (same architecture, same initial weights)."""
    teacher = copy.deepcopy(student)
    teacher.requires_grad_(False)
    return teacher.eval()


@torch.no_grad()
def ema_update_(
    teacher: nn.Module,
    student: nn.Module,
    momentum: float,
    shared: Callable[[str], bool] = lambda name: False,
) -> None:
    """In place: t <- m t + (1 - m) s for every parameter; names for which ``shared(name)`` is
    True are copied from the student instead (parameters the released code does not duplicate,
    e.g. the text token embedding). Floating buffers are copied (they are not learned)."""
    sp = dict(student.named_parameters())
    tp = dict(teacher.named_parameters())
    if sp.keys() != tp.keys():
        missing = sorted(sp.keys() ^ tp.keys())[:3]
        raise ValueError(f"teacher and student architectures differ (parameters {missing})")
    for name, t in tp.items():
        s = sp[name].detach()
        if shared(name):
            t.copy_(s)
        else:
            t.mul_(momentum).add_(s.to(t.dtype), alpha=1.0 - momentum)
    sb = dict(student.named_buffers())
    for name, t in teacher.named_buffers():
        if name in sb and t.is_floating_point():
            t.copy_(sb[name])
