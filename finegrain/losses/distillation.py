"""Self-distillation losses of DINO (Caron et al. 2021, Eq. 1-2) and iBOT (Zhou et al. 2022,
Eq. 1-2) as DetailCLIP composes them (Monsefi et al. 2024; released ``iBOTLoss`` with two global
views and no local crops).

With student logits s, teacher logits t, centre c, temperatures tau_s, tau_t:

    P_t = softmax((t - c) / tau_t),   log P_s = log_softmax(s / tau_s),   H(P_t, P_s) = -sum_k P_t log P_s

- CLS loss (DINO, across views): mean over ordered pairs of views q != v of mean_b H(P_t[b, q], P_s[b, v]).
- patch loss (iBOT MIM, within a view): for each view v, mean_b of the mean over the removed
  positions of H(P_t[b, v, j], P_s[b, v, j]); then mean over views. Rows without removed
  positions contribute 0 (released ``clamp(min=1)``).
- centre: c <- m c + (1 - m) mean(t) over the global batch (all-reduced), m = 0.9; the patch
  centre uses the per-image mean over *all* patches first. Updated after the loss uses the old c.
- teacher temperature: a pure function of the step (``teacher_temperature``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from finegrain.losses.distributed import all_reduce_mean


def _f32(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 logits are upcast; float64 stays float64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cross_entropy(p_teacher: torch.Tensor, s_logits: torch.Tensor, tau_s: float) -> torch.Tensor:
    return -(p_teacher * F.log_softmax(_f32(s_logits) / tau_s, dim=-1)).sum(-1)


def teacher_probs(t: torch.Tensor, center: torch.Tensor, tau_t: float) -> torch.Tensor:
    """Centred, sharpened teacher distribution (no gradient)."""
    return F.softmax((_f32(t.detach()) - center.to(_f32(t).dtype)) / tau_t, dim=-1)


def dino_cls_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """student, teacher: (B, V, K) CLS logits of V >= 2 views; center (K,) or (1, K)."""
    assert student.shape == teacher.shape and student.dim() == 3, (
        f"CLS logits must be (B, V, K) alike, got {tuple(student.shape)} / {tuple(teacher.shape)}"
    )
    v = student.shape[1]
    if v < 2:
        raise ValueError(f"the DINO CLS loss needs >= 2 views, got {v}")
    pt = teacher_probs(teacher, center.reshape(1, 1, -1), teacher_temp)  # (B, V, K)
    total, terms = 0.0, 0
    for q in range(v):
        for s in range(v):
            if s != q:
                total = total + _cross_entropy(pt[:, q], student[:, s], student_temp).mean()
                terms += 1
    return total / terms


def ibot_patch_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.07,
) -> torch.Tensor:
    """student, teacher: (B, V, R, K) logits at the R removed positions of each view (the same
    R for every image); center (K,). Mean over positions, images, then views."""
    assert student.shape == teacher.shape and student.dim() == 4, (
        f"patch logits must be (B, V, R, K) alike, got {tuple(student.shape)} / {tuple(teacher.shape)}"
    )
    if student.shape[2] == 0:
        return student.sum() * 0.0  # nothing removed: no MIM target (released clamp(min=1))
    pt = teacher_probs(teacher, center.reshape(1, 1, 1, -1), teacher_temp)
    h = _cross_entropy(pt, student, student_temp)  # (B, V, R)
    return h.mean(dim=2).mean(dim=0).mean()


@torch.no_grad()
def batch_center(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., K) teacher logits -> (K,) mean over every leading dim and every rank."""
    flat = _f32(t.detach()).reshape(-1, t.shape[-1])
    return all_reduce_mean(flat.sum(0), flat.shape[0])


@torch.no_grad()
def ema_center(
    center: torch.Tensor, batch_mean: torch.Tensor, momentum: float = 0.9
) -> torch.Tensor:
    """c <- m c + (1 - m) batch_mean (DINO Eq. 4)."""
    return center * momentum + batch_mean.reshape(center.shape).to(center.dtype) * (1 - momentum)


def teacher_temperature(
    step: int,
    warmup_steps: int,
    warmup_temp: float,
    final_temp: float,
    warmup_epochs: int = 1,
    mode: Literal["epochwise", "linear"] = "epochwise",
) -> float:
    """Teacher temperature at ``step``.

    ``epochwise`` (released, DINO/iBOT code): the warm-up is ``np.linspace(warmup_temp,
    final_temp, warmup_epochs)`` indexed by the epoch, ``warmup_steps / warmup_epochs`` steps per
    epoch; with one warm-up epoch the temperature is ``warmup_temp`` for the whole first epoch and
    ``final_temp`` afterwards. ``linear``: a per-step linear ramp over ``warmup_steps``.
    """
    if step >= warmup_steps or warmup_steps <= 0:
        return float(final_temp)
    if mode == "linear":
        return float(warmup_temp + (final_temp - warmup_temp) * step / warmup_steps)
    if mode != "epochwise":
        raise ValueError(f"unknown temperature warm-up '{mode}'; valid choices: epochwise, linear")
    epoch = int(step * warmup_epochs // warmup_steps)
    if warmup_epochs == 1:
        return float(warmup_temp)
    return float(warmup_temp + (final_temp - warmup_temp) * epoch / (warmup_epochs - 1))


def ema_momentum(step: int, total_steps: int, base: float = 0.996, final: float = 1.0) -> float:
    """Cosine EMA momentum (BYOL Sec. 3.2; released ``cosine_scheduler(0.996, 1, ...)``):
    m(k) = final - (final - base) (cos(pi k / K) + 1) / 2, from ``base`` at k = 0 to ``final`` at K."""
    if total_steps <= 0:
        return float(base)
    k = min(max(step, 0), total_steps)
    return float(final - (final - base) * (math.cos(math.pi * k / total_steps) + 1) / 2)
