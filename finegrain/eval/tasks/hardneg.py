"""Boxes with hard-negative descriptions (FG-OVD) as a task object: data from
``finegrain.eval.hardneg_data.load_hardneg_data``, ranks from ``evaluate_hardneg``."""

from __future__ import annotations

from typing import Any

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


register_task(HardNegTask())
