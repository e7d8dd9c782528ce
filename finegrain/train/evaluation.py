"""Evaluation during training: ``cfg.eval.tasks`` on rank 0, the training RNG untouched.

Periodic evaluations (``train.eval_every``) log their metrics; the final one also writes plots
and ``eval/results.{json,md}`` + ``protocol.json`` into a fresh folder (``eval``, ``eval-2``, ...), so results of
an earlier evaluation are never replaced. Every rank waits at a barrier for rank 0.
"""

from __future__ import annotations

from pathlib import Path

import torch

from finegrain.eval import run_tasks, write_report
from finegrain.run_config import RunConfig
from finegrain.train import checkpoint as ckpt
from finegrain.train import distributed as dist_utils
from finegrain.train import guard
from finegrain.train.logging import RunLogger

HEADLINE = ("recall@1", "acc1", "miou")  # metrics echoed on the console after an eval


def evaluate_during_training(
    method: torch.nn.Module,
    cfg: RunConfig,
    *,
    run_dir: Path,
    device: torch.device,
    step: int,
    log: RunLogger,
    is_main: bool,
    final: bool = False,
) -> dict[str, float]:
    """Run ``cfg.eval.tasks`` (rank 0) and log them at ``step``; {} when there are none or on
    other ranks. The method is put back in train mode and the RNG state restored after."""
    tasks = list(cfg.eval.tasks)
    results: dict[str, float] = {}
    if tasks and is_main:
        rng = ckpt.rng_state()
        out_dir = guard.unique_dir(run_dir / "eval") if final else None
        cards: dict[str, dict] = {}  # the protocol card of every task (protocol.json)
        try:
            results = run_tasks(
                method,
                tasks,
                device=str(device),
                out_dir=out_dir,
                progress=False,
                data_cfg=cfg.data,
                protocols=cards,
                run_info={"checkpoint": str(run_dir), "step": step, "seed": cfg.seed},
            )
        finally:
            method.train()
            ckpt.set_rng_state(rng)
        if out_dir is not None:
            write_report(results, out_dir, cards)
        log.metrics(step, results)
        head = {k: v for k, v in results.items() if k.endswith(HEADLINE)}
        shown = ", ".join(f"{k}={v:.4g}" for k, v in head.items())
        log.write(f"eval @ step {step}: {shown}")
    dist_utils.barrier()
    return results
