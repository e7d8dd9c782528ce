"""What a training checkpoint holds beyond the weights, and how the trainer writes and reads it.

Exact resume needs, next to weights and optimizer: the step, the skipped-step count, the
``GradScaler``, and *per rank* the RNG state, the data position and the stats totals. Saving
is collective (every rank contributes its part; FSDP gathers full weights and optimizer
state); rank 0 writes. File layout, atomic writes and verification live in ``checkpoint``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finegrain.checkpoint import check_compatible, latest_checkpoint
from finegrain.train import checkpoint as ckpt
from finegrain.train import distributed as dist_utils
from finegrain.train import guard
from finegrain.train.distributed import DistInfo


@dataclass
class ResumePoint:
    """Where a resumed run continues: counters, this rank's stats, the optimizer state (loaded
    by the trainer once the optimizer exists, i.e. after FSDP wrapping)."""

    step: int
    skipped: int
    stats: dict[str, float] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)


def load_run_state(
    resume_dir: Path,
    *,
    method: torch.nn.Module,
    scaler: torch.amp.GradScaler,
    loader: Any,
    info: DistInfo,
) -> ResumePoint:
    """Load weights, scaler, this rank's data position and RNG state from ``resume_dir``."""
    weights, state = ckpt.load_state(resume_dir)
    weights = method.migrate_state_dict(weights)  # keys renamed since it was written
    check_compatible(method, weights, str(resume_dir))
    method.load_state_dict(weights)
    scaler.load_state_dict(state["scaler"])
    per_rank = state["per_rank"]
    if len(per_rank) != info.world_size:
        raise ValueError(
            f"checkpoint {resume_dir} was written by {len(per_rank)} ranks, this run has "
            f"{info.world_size}; exact resume needs the same world size"
        )
    mine = per_rank[info.rank]
    if mine.get("data") is not None:
        loader.load_state_dict(mine["data"])
    ckpt.set_rng_state(mine["rng"])
    return ResumePoint(
        step=int(state["step"]),
        skipped=int(state["skipped"]),
        stats={k: float(v) for k, v in mine.get("stats", {}).items()},
        optimizer=state["optimizer"],
    )


def save_run_state(
    run_dir: Path,
    *,
    step: int,
    skipped: int,
    method: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    loader: Any,
    stats: dict[str, float],
    info: DistInfo,
    fsdp: bool,
    keep_last: int,
) -> Path | None:
    """Write the step ``step`` checkpoint under ``run_dir/ckpt`` (collective; rank 0 writes and
    gets the path, other ranks None). A failed write raises ``CheckpointWriteError`` naming the
    previous checkpoint, which stays intact."""
    mine = {
        "rng": ckpt.rng_state(),
        "data": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "stats": dict(stats),
    }
    per_rank = [mine]
    if info.enabled:
        per_rank = [None] * info.world_size
        torch.distributed.all_gather_object(per_rank, mine)
    weights = ckpt.model_state(method)  # collective under FSDP (full_tensor)
    optim_state = dist_utils.optimizer_state(method, optimizer, full=fsdp)
    path = None
    if info.is_main:
        state = {
            "step": step,
            "skipped": skipped,
            "per_rank": per_rank,
            "optimizer": optim_state,
            "scaler": scaler.state_dict(),
        }
        root = run_dir / "ckpt"
        try:
            path = ckpt.save_checkpoint(root, step, weights, state, keep_last)
        except OSError as e:  # disk full, read-only, quota: stop, the last one is intact
            prev = latest_checkpoint(run_dir)
            raise guard.CheckpointWriteError(
                f"cannot write the step {step} checkpoint under {root}: "
                f"{e.strerror or e}; the previous checkpoint "
                f"{prev.name if prev else '(none)'} is intact"
            ) from None
    dist_utils.barrier()
    return path
