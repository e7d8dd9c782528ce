"""Compositional image-text matching (SugarCrepe, Winoground) as a task object: data from
``finegrain.eval.compositional_data.load_compositional_data``, scores from
``evaluate_compositional``."""

from __future__ import annotations

from typing import Any

from finegrain.eval.compositional import evaluate_compositional
from finegrain.eval.compositional_data import load_compositional_data
from finegrain.eval.config import CompositionalTaskConfig
from finegrain.eval.task import EvalTask, register_task


class CompositionalTask(EvalTask):
    name, Config = "compositional", CompositionalTaskConfig

    def load(self, cfg: CompositionalTaskConfig, image_size: int) -> Any:
        return load_compositional_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: CompositionalTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_compositional(ctx, cfg, data)


register_task(CompositionalTask())
