"""Run logging: TensorBoard scalars, a tqdm bar (ETA, samples/s), a concise console line,
optional Weights & Biases. Only rank 0 writes files, the bar and the console; scalars that
differ per rank (samples/s, data wait) are logged by every rank under ``rank<r>/``."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch


def _num(v: Any) -> float:
    if isinstance(v, torch.Tensor):
        return float(v.detach().float().item())
    return float(v)


class RunLogger:
    """Collects per-step scalars and writes them every ``log_every`` steps."""

    def __init__(
        self,
        run_dir: str | Path,
        *,
        rank: int = 0,
        total_steps: int,
        start_step: int = 0,
        log_every: int = 10,
        progress: bool = True,
        wandb: bool = False,
        run_name: str = "run",
        config: dict[str, Any] | None = None,
    ) -> None:
        self.rank = rank
        self.main = rank == 0
        self.log_every = max(1, log_every)
        self.tb = None
        self.bar = None
        self.wandb = None
        tb_dir = Path(run_dir) / "tb"
        try:  # every rank logs its own throughput, into its own event file
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tb_dir if self.main else tb_dir / f"rank{rank}"))
        except ImportError:  # tensorboard is optional at runtime
            warnings.warn("tensorboard is not installed; scalars are not written", stacklevel=2)
        if self.main and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total_steps,
                initial=start_step,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                desc=run_name,
            )
        if self.main and wandb:
            self.wandb = _init_wandb(run_name, config)
        self._acc: dict[str, float] = {}
        self._n = 0

    def step(self, step: int, scalars: dict[str, Any], samples_per_s: float) -> None:
        """Record the scalars of optimizer step ``step`` (1-based, after the update)."""
        vals = {k: _num(v) for k, v in scalars.items()}
        for k, v in vals.items():
            self._acc[k] = self._acc.get(k, 0.0) + v
        self._n += 1
        if self.bar is not None:
            self.bar.update(1)
            if step % self.log_every == 0 or step == 1:
                self.bar.set_postfix(
                    loss=f"{vals.get('loss', math.nan):.4f}",
                    sps=f"{samples_per_s:.1f}",
                    refresh=False,
                )
        if step % self.log_every != 0:
            return
        means = {k: v / self._n for k, v in self._acc.items()}
        self._acc, self._n = {}, 0
        self.scalars(step, means, per_rank=("samples_per_s", "data_wait_s", "step_time_s"))
        if self.main:
            keys = [k for k in means if k.endswith("loss")] + ["lr", "samples_per_s"]
            keys += [k for k in means if k.startswith("stats/")]  # per-step means of counts
            line = " ".join(f"{k}={means[k]:.4g}" for k in keys if k in means)
            self.write(f"step {step}: {line}")

    def scalars(self, step: int, values: dict[str, float], per_rank: tuple[str, ...] = ()) -> None:
        if self.tb is not None:
            for k, v in values.items():
                if self.main or k in per_rank:
                    tag = f"rank{self.rank}/{k}" if k in per_rank else _tag(k)
                    self.tb.add_scalar(tag, v, step)
        if self.wandb is not None:
            self.wandb.log({_tag(k): v for k, v in values.items()}, step=step)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        """Evaluation results (rank 0)."""
        if not self.main:
            return
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"eval/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in values.items()}, step=step)

    def write(self, msg: str) -> None:
        if not self.main:
            return
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _tag(key: str) -> str:
    """``stats/<name>`` keys (the stats channel) keep their own section; the rest ``train/``."""
    return key if key.startswith("stats/") else f"train/{key}"


def _init_wandb(name: str, config: dict[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError:
        warnings.warn("train.wandb=true but wandb is not installed; skipping", stacklevel=3)
        return None
    wandb.init(project="finegrain", name=name, config=config or {})
    return wandb


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
