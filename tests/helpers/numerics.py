"""Exactness checks that hold on every machine.

Two computations that are equal in exact arithmetic (micro-batches vs the full batch, two
ranks vs one process, chunked vs looped) differ in float32 by rounding that depends on the
kernels (AVX2 vs AVX-512 GEMM blocking): an element of a gradient of magnitude 35 can move by
1.5e-5. Compare either in float64 (then tight tolerances hold everywhere) or with an absolute
tolerance scaled to the tensor's magnitude (``assert_close_scaled``). Bitwise checks are only
for the same computation run twice on the same machine (kill-and-resume).
"""

from __future__ import annotations

from typing import Any

import torch


def assert_close_scaled(
    actual: torch.Tensor,
    expected: torch.Tensor,
    rtol: float = 1e-4,
    atol_rel: float = 1e-6,
    msg: str = "",
    atol: float = 0.0,
) -> None:
    """``assert_close`` with ``atol = max(atol, atol_rel * max|expected|)``: the absolute slack
    follows the tensor's magnitude (rounding of a sum is relative to its largest terms, not to
    each element), so an element near zero in a large tensor does not fail on rounding."""

    def message(m: str) -> str:
        return f"{msg}: {m}" if msg else m

    if not expected.is_floating_point():  # counts, indices: exact
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=message)
        return
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    atol = max(atol, atol_rel * scale, 1.0e-30)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=message)


def tensor_slice(batch: dict[str, Any], start: int, stop: int) -> dict[str, Any]:
    """Rows ``start:stop`` of every tensor in a batch (non-tensors, e.g. counts, dropped)."""
    return {k: v[start:stop] for k, v in batch.items() if torch.is_tensor(v) and v.dim() > 0}


def concatenated_feature_grads(
    method: torch.nn.Module, batch: dict[str, Any], splits: list[tuple[int, int]]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients through cached micro-batch features (the trainer's exact
    accumulation): features of each split without grad, concatenated into leaves, one loss over
    the whole batch, then each split's features recomputed and back-propagated with its slice
    of the leaves' gradient (chain rule)."""
    method.zero_grad()
    parts = [tensor_slice(batch, a, b) for a, b in splits]
    with torch.no_grad():
        cached = [method.features(p) for p in parts]
    leaves = {
        k: torch.cat([c[k] for c in cached]).requires_grad_(cached[0][k].is_floating_point())
        for k in cached[0]
    }
    loss = method.loss_from_features(leaves).loss
    loss.backward()
    for (a, b), part in zip(splits, parts):
        f = method.features(part)
        keys = [k for k in f if leaves[k].grad is not None and f[k].requires_grad]
        torch.autograd.backward([f[k] for k in keys], [leaves[k].grad[a:b] for k in keys])
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    return loss.detach(), grads


def full_batch_grads(
    method: torch.nn.Module, batch: dict[str, Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and parameter gradients of one forward/backward over the whole batch."""
    method.zero_grad()
    loss = method(batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    return loss.detach(), grads


def assert_grads_close(
    actual: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    rtol: float = 1e-4,
    atol_rel: float = 1e-6,
) -> None:
    """Same set of parameters with a gradient, each close (scaled tolerance)."""
    assert set(actual) == set(expected), sorted(set(actual) ^ set(expected))
    for name, g in expected.items():
        assert_close_scaled(actual[name], g, rtol=rtol, atol_rel=atol_rel, msg=name)
