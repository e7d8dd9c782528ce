"""Trainer config (optimizer, schedule, precision, checkpointing, logging)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from finegrain.config import Checked


@dataclass
class TrainConfig(Checked):
    steps: int = 100  # optimizer steps in total
    lr: float = 5e-4
    min_lr: float = 0.0  # cosine floor
    warmup_steps: int = 10
    weight_decay: float = 0.2
    # which parameters get no decay: "released" = each method's released code (OpenCLIP's rule:
    # 1-d params, norms, biases, logit scale/bias; GRAIN's decoder by name), "extended" = also
    # token/position embeddings, class tokens and learned queries (finegrain's old default)
    no_decay: Literal["released", "extended"] = "released"
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    grad_clip: float = 0.0  # max grad norm; 0 = off
    accum_steps: int = 1  # exact contrastive gradient accumulation (feature caching)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    compile: bool = False
    distributed: Literal["ddp", "fsdp"] = "ddp"  # used only when world size > 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every: int = 50  # steps; 0 = only at the end
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # steps; 0 = only at the end
    nan_policy: Literal["stop", "skip"] = "stop"  # non-finite loss or gradient (named)
    timeout_s: float = 1800.0  # process-group collective timeout: a hung rank fails the job
    progress: bool = True
    wandb: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.timeout_s <= 0:
            raise ValueError(f"train.timeout_s must be > 0 seconds, got {self.timeout_s}")
