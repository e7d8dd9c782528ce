"""A tiny but real method + in-memory loader for trainer tests (no dependency on other areas).

ToyCLIP: linear image and text towers, a learned logit scale, symmetric InfoNCE
(Radford et al. 2021, Fig. 3 pseudo-code). ToyEMA: ToyCLIP plus an EMA teacher of the image
tower (a ``frozen_modules`` entry) and a DINO-style centre buffer, distilled with a
cross-entropy to the centred, sharpened teacher output (Caron et al. 2021, eq. 1-4). ToyLoader: an endless, seeded, resumable iterable of
batches with the ``TrainLoader`` interface (``state_dict``/``load_state_dict``/``stats``).

Run as a script it trains through ``Trainer`` (used by the SIGKILL resume test):
``python tests/toy_method.py OUT_DIR STEPS CKPT_EVERY [--resume latest] [--sleep S]``.
"""

from __future__ import annotations

import copy
import math
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from finegrain.methods.base import Method, MethodConfig
from finegrain.outputs import MethodOutput
from finegrain.registry import METHODS

IMG, TXT = 12, 10


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy_clip"
    embed_dim: int = 8
    hidden: int = 16
    dropout: float = 0.0
    nan_after: int = -1  # make the loss NaN from this optimizer step on (tests)


class ToyCLIP(Method):
    Config = ToyConfig

    def __init__(self, cfg: ToyConfig) -> None:
        super().__init__(cfg)
        self.image_proj = nn.Sequential(
            nn.Linear(IMG, cfg.hidden),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.hidden, cfg.embed_dim),
        )
        self.text_proj = nn.Sequential(
            nn.Linear(TXT, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.embed_dim)
        )
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))
        self.hook_calls: list[tuple[int, int]] = []  # (step, total_steps) of applied steps

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return {"image": self.image_proj(batch["image"]), "text": self.text_proj(batch["text"])}

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        img = F.normalize(feats["image"].float(), dim=-1)  # (B, D)
        txt = F.normalize(feats["text"].float(), dim=-1)  # (B, D)
        logits = self.logit_scale.exp() * img @ txt.t()  # (B, B)
        labels = torch.arange(len(img), device=img.device)
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        if 0 <= self.cfg.nan_after <= int(self.steps_seen):
            loss = loss * float("nan")
        return MethodOutput(
            loss=loss,
            losses={"contrastive_loss": loss.detach()},
            metrics={"logit_scale": self.logit_scale.detach().exp()},
        )

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        self.steps_seen.fill_(step)
        self.hook_calls.append((step, total_steps))

    def make_collate(self, train: bool = True):
        return collate


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0]}


if "toy_clip" not in METHODS:
    METHODS.add("toy_clip", ToyCLIP)


@dataclass
class ToyEMAConfig(ToyConfig):
    name: str = "toy_ema"
    momentum: float = 0.9  # teacher EMA momentum, cosine-scheduled to 1 (DINO)
    center_momentum: float = 0.8


class ToyEMA(ToyCLIP):
    """ToyCLIP + EMA teacher + centre: the state a DINO/iBOT/DetailCLIP teacher carries."""

    Config = ToyEMAConfig

    def __init__(self, cfg: ToyEMAConfig) -> None:
        super().__init__(cfg)
        self.teacher = copy.deepcopy(self.image_proj)
        self.register_buffer("center", torch.zeros(cfg.embed_dim))
        self._batch_center: torch.Tensor | None = None

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"teacher": self.teacher}

    def features(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        feats = super().features(batch)
        with torch.no_grad():
            feats["teacher"] = self.teacher(batch["image"])  # (B, D)
        return feats

    def loss_from_features(self, feats: dict[str, torch.Tensor]) -> MethodOutput:
        out = super().loss_from_features(feats)
        t = F.softmax((feats["teacher"].float() - self.center) / 0.04, dim=-1)  # (B, D)
        s = F.log_softmax(feats["image"].float() / 0.1, dim=-1)  # (B, D)
        distill = -(t * s).sum(-1).mean()
        self._batch_center = feats["teacher"].detach().float().mean(0)  # applied after the step
        return MethodOutput(
            loss=out.loss + distill,
            losses={**out.losses, "distill_loss": distill.detach()},
            metrics=out.metrics,
            stats={"teacher_rows": float(len(t))},
        )

    def momentum_at(self, step: int, total_steps: int) -> float:
        """DINO's cosine schedule from ``momentum`` to 1, a pure function of the step."""
        base = self.cfg.momentum
        return 1 - (1 - base) * (math.cos(math.pi * step / total_steps) + 1) / 2

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        super().after_optimizer_step(step, total_steps)
        m, cm = self.momentum_at(step, total_steps), self.cfg.center_momentum
        with torch.no_grad():
            for pt, ps in zip(self.teacher.parameters(), self.image_proj.parameters()):
                pt.mul_(m).add_(ps.detach(), alpha=1 - m)
            self.center.mul_(cm).add_(self._batch_center, alpha=1 - cm)


if "toy_ema" not in METHODS:
    METHODS.add("toy_ema", ToyEMA)


class ToyLoader:
    """Endless batches over a fixed seeded dataset, reshuffled per epoch from (seed, epoch)."""

    def __init__(
        self, n: int = 64, batch_size: int = 8, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        g = torch.Generator().manual_seed(1234)
        latent = torch.randn(n, 6, generator=g)
        self.images = latent @ torch.randn(6, IMG, generator=g) + 0.1 * torch.randn(
            n, IMG, generator=g
        )
        self.texts = latent @ torch.randn(6, TXT, generator=g)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.epoch, self.pos, self.seen = 0, 0, 0
        self.epoch_length = n // (batch_size * world_size)

    def _order(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        return torch.randperm(len(self.images), generator=g)[self.rank :: self.world]

    def __iter__(self):
        while True:
            order = self._order()
            while self.pos < self.epoch_length:
                idx = order[self.pos * self.batch_size : (self.pos + 1) * self.batch_size]
                self.pos += 1
                self.seen += len(idx)
                yield {"image": self.images[idx], "text": self.texts[idx]}
            self.epoch, self.pos = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos, "seen": self.seen}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos, self.seen = state["epoch"], state["pos"], state["seen"]

    def stats(self) -> dict[str, int]:
        return {"seen": self.seen, "broken": 0}


def toy_run_config(out_dir: str, steps: int = 8, method: ToyConfig | None = None, **train: Any):
    from finegrain.recipes.base import RunConfig

    method = method or ToyConfig(dropout=0.1)
    cfg = RunConfig(name="toy", output_dir=str(out_dir), method=method)
    cfg.data.batch_size = 8
    cfg.train.steps, cfg.train.warmup_steps, cfg.train.lr = steps, 2, 1e-2
    cfg.train.progress, cfg.train.log_every = False, 2
    cfg.train.checkpoint_every = 0
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg


def toy_trainer(
    out_dir: str,
    steps: int = 8,
    resume: str | None = None,
    method: ToyConfig | None = None,
    **train: Any,
):
    from finegrain.train.trainer import Trainer

    cfg = toy_run_config(out_dir, steps, method, **train)
    return Trainer(
        cfg, loader=ToyLoader(batch_size=cfg.data.batch_size, seed=cfg.seed), resume=resume
    )


class StatsLoader(ToyLoader):
    """ToyLoader whose batches also carry the collate's stats channel (``batch["stats"]``)."""

    def __iter__(self):
        for b in super().__iter__():
            yield {**b, "stats": {"toy_samples": float(len(b["image"])), "toy_batches": 1.0}}


class _SlowLoader(ToyLoader):
    sleep = 0.0

    def __iter__(self):
        for b in super().__iter__():
            time.sleep(self.sleep)
            yield b


if __name__ == "__main__":
    out, steps, every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    resume = sys.argv[sys.argv.index("--resume") + 1] if "--resume" in sys.argv else None
    from finegrain.train.trainer import Trainer

    cfg = toy_run_config(out, steps, checkpoint_every=every)
    loader = _SlowLoader(batch_size=cfg.data.batch_size, seed=cfg.seed)
    loader.sleep = float(sys.argv[sys.argv.index("--sleep") + 1]) if "--sleep" in sys.argv else 0.0
    Trainer(cfg, loader=loader, resume=resume).fit()
