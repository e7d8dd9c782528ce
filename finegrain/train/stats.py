"""What the trainer logs per step: the scalars and the stats channel.

Stats: the collate's ``batch["stats"]`` (summed over the micro-batches of a step) and the
method's ``MethodOutput.stats`` are logged as ``stats/<name>`` (TensorBoard, console) and summed
over the run into summary.json's ``"stats"`` (checkpointed, so a resumed run totals the same).
"""

from __future__ import annotations

from typing import Any

import torch

from finegrain.outputs import MethodOutput


def step_stats(micro: list[dict[str, Any]], out: MethodOutput) -> dict[str, float]:
    """The stats channel of one step: ``batch["stats"]`` summed over the micro-batches, plus
    the method's ``out.stats`` (a key in both is summed)."""
    total: dict[str, float] = {}
    for b in micro:
        for k, v in (b.get("stats") or {}).items() if isinstance(b, dict) else ():
            total[k] = total.get(k, 0.0) + float(v)
    for k, v in out.stats.items():
        total[k] = total.get(k, 0.0) + float(v)
    return total


def batch_size(batch: Any) -> int:
    """Leading size of the first non-scalar tensor of a batch (0 when there is none)."""
    for v in batch.values() if isinstance(batch, dict) else [batch]:
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def step_scalars(
    out: MethodOutput,
    stats: dict[str, float],
    *,
    lr: float,
    samples: int,
    data_wait_s: float,
    step_time_s: float,
    skipped: int,
    loader_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The scalars of one step for ``RunLogger.step``: loss and its terms, the method's
    metrics, timing, ``stats/*`` and (when given) the loader's numeric counters as ``data_*``."""
    scalars: dict[str, Any] = {
        "loss": out.loss.detach(),
        "lr": lr,
        "data_wait_s": data_wait_s,
        "step_time_s": step_time_s,
        "samples_per_s": samples / max(step_time_s, 1e-9),
        "skipped_steps": skipped,
    }
    scalars.update({k: v.detach() for k, v in out.losses.items()})
    scalars.update(out.metrics)
    scalars.update({f"stats/{k}": v for k, v in stats.items()})
    if loader_stats is not None:
        scalars.update(
            {f"data_{k}": v for k, v in loader_stats.items() if isinstance(v, (int, float))}
        )
    return scalars
