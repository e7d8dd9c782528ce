"""The run config: one ``RunConfig`` per training run, and the checks that need no building.

It imports only the config dataclasses of the layers below it (data, towers, method, eval) and
defines the trainer's own ``TrainConfig`` here, so that ``checkpoint/`` (reading runs),
``interop/``, ``train/``, ``recipes/`` and the CLI import it without importing each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from finegrain.config import Checked, validate_config
from finegrain.data.config import DataConfig
from finegrain.eval.config import EvalConfig
from finegrain.methods.base import MethodConfig
from finegrain.registry import IMAGE_TOWERS, METHODS, TEXT_TOWERS


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


@dataclass
class RunConfig(Checked):
    name: str = "run"
    output_dir: str = ""  # '' = $FINEGRAIN_HOME/runs/<name>
    seed: int = 0
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def validate_trainer(cfg: RunConfig) -> None:
    """Trainer-level checks with one-line messages: every choice field of the whole tree
    (also for configs built or changed in Python) and the counts that must be positive."""
    validate_config(cfg)
    t = cfg.train
    for key in ("steps", "accum_steps"):
        if getattr(t, key) < 1:
            raise ValueError(f"train.{key} must be >= 1, got {getattr(t, key)}")
    if cfg.data.batch_size < 1:
        raise ValueError(f"data.batch_size must be >= 1, got {cfg.data.batch_size}")


def validate_run(cfg: RunConfig) -> None:
    """Check what can be checked without building anything: registered names, choice fields,
    trainer fields. Raises a one-line ``ValueError`` naming the valid choices."""
    METHODS.get(cfg.method.name)
    IMAGE_TOWERS.get(cfg.method.image.name)
    TEXT_TOWERS.get(cfg.method.text.name)
    validate_trainer(cfg)
