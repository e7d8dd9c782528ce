"""One optimizer step's gradient computation, shared by every method.

``exact_accumulation`` implements gradient accumulation that is *exactly* the large-batch
gradient for losses that couple the samples of a batch (contrastive losses), in the spirit of
OpenCLIP's ``--accum-freq`` and GradCache (Gao et al., 2021, "Scaling Deep Contrastive
Learning Batch Size under Memory Limited Setup", Sec. 3.2):

1. features of every micro-batch under ``no_grad`` -> cached, concatenated along dim 0;
2. the loss on the *full* concatenated features, taken as leaves, is backpropagated once:
   this gives dL/d(features) for all samples and the gradient of parameters used directly by
   the loss (logit scale/bias) exactly once;
3. each micro-batch's features are recomputed with grad (same RNG state as in step 1, so
   dropout masks match) and backpropagated with their slice of dL/d(features).

By the chain rule, dL/dθ = Σ_i (dL/df_i)(df_i/dθ) + ∂L/∂θ, which is what steps 2-3 sum.
OpenCLIP re-evaluates the loss once per micro-batch with the others' features substituted;
that gives the same feature-path gradient but counts the direct-parameter term once per
micro-batch, so we evaluate the loss once instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch

from finegrain.outputs import MethodOutput

Features = dict[str, torch.Tensor]


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def _rng_snapshot(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _rng_restore(snap: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(snap[0])
    if snap[1] is not None:
        torch.cuda.set_rng_state(snap[1], device)


def check_features(feats: Features, where: str) -> None:
    assert isinstance(feats, dict) and feats, f"{where}: features() must return a non-empty dict"
    sizes = {k: v.shape[0] for k, v in feats.items()}
    assert len(set(sizes.values())) == 1, (
        f"{where}: every feature needs the batch as leading dim, got sizes {sizes}"
    )


def exact_accumulation(
    micro_batches: list[dict[str, Any]],
    features_fn: Callable[[dict[str, Any]], Features],
    loss_fn: Callable[[Features], MethodOutput],
    *,
    scale: Callable[[torch.Tensor], torch.Tensor] = lambda x: x,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    check_loss: Callable[[MethodOutput], bool] = lambda out: True,
    sync_context: Callable[[bool], contextlib.AbstractContextManager] | None = None,
    device: torch.device | None = None,
) -> tuple[MethodOutput, bool]:
    """Accumulate the full-batch gradient over ``micro_batches`` into ``.grad``.

    ``scale`` maps the loss before backward (fp16 loss scaling); ``check_loss`` returns False
    to abort before any backward (non-finite loss); ``sync_context(is_last)`` wraps each
    recompute (e.g. to defer gradient sync to the last micro-batch). Returns (output, done).
    """
    device = device if device is not None else torch.device("cpu")
    snaps, cached = [], []
    with torch.no_grad():
        for mb in micro_batches:  # step 1: cache features, remembering the RNG state
            snaps.append(_rng_snapshot(device))
            with autocast():
                f = features_fn(mb)
            check_features(f, "features")
            cached.append(f)
    leaves = {
        k: torch.cat([c[k] for c in cached])
        .detach()
        .requires_grad_(cached[0][k].is_floating_point())
        for k in cached[0]
    }  # (B_total, ...)
    with autocast():  # step 2: the loss on the full batch, once
        out = loss_fn(leaves)
    if not check_loss(out):
        return out, False
    scale(out.loss).backward()
    offset = 0
    for i, mb in enumerate(micro_batches):  # step 3: recompute with grad, chain-rule backward
        n = next(iter(cached[i].values())).shape[0]
        ctx = (
            sync_context(i == len(micro_batches) - 1) if sync_context else contextlib.nullcontext()
        )
        with ctx:
            _rng_restore(snaps[i], device)
            with autocast():
                f = features_fn(mb)
            pairs = [
                (f[k], leaves[k].grad[offset : offset + n])
                for k in f
                if f[k].requires_grad and leaves[k].grad is not None
            ]
            if pairs:
                torch.autograd.backward([p[0] for p in pairs], [p[1] for p in pairs])
        offset += n
    return out, True
