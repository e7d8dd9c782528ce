"""Boxes with hard-negative descriptions (FG-OVD) as a task object: data from
``finegrain.eval.hardneg_data.load_hardneg_data``, ranks from ``evaluate_hardneg``."""

from __future__ import annotations

from typing import Any

import torch

from finegrain.eval.config import HardNegTaskConfig
from finegrain.eval.hardneg import evaluate_hardneg
from finegrain.eval.hardneg_data import load_hardneg_data
from finegrain.eval.task import EvalTask, register_task


class HardNegTask(EvalTask):
    name, Config = "hardneg", HardNegTaskConfig

    def load(self, cfg: HardNegTaskConfig, image_size: int) -> Any:
        return load_hardneg_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: HardNegTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_hardneg(ctx, cfg, data)

    def leading_modifiers(self, cfg: HardNegTaskConfig) -> list[str]:
        return [cfg.scoring if cfg.scoring != "global" else ""]

    def modifiers(self, cfg: HardNegTaskConfig) -> list[str]:
        return [cfg.region if cfg.region != "auto" else ""]

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Each box's positive strictly above all its negatives (ties are errors, as
        ``finegrain.eval.hardneg``), with its image."""
        right = [float(bool((s[1:] < s[0]).all())) for s in art["scores"]]
        owner = [it.image for it in art["items"]]
        return {"acc1": (torch.tensor(right, dtype=torch.float64), torch.tensor(owner))}


register_task(HardNegTask())
