"""Bottom-up grouping (CLIPpy, Ranasinghe et al. 2023) as a task object: data from
``finegrain.eval.grouping.load_grouping_data``, per-instance Jaccard from ``evaluate_grouping``;
its inference size as a name modifier; no figures."""

from __future__ import annotations

from typing import Any

from finegrain.eval.config import GroupingTaskConfig
from finegrain.eval.grouping import evaluate_grouping, load_grouping_data
from finegrain.eval.task import EvalTask, register_task


class GroupingTask(EvalTask):
    name, Config = "grouping", GroupingTaskConfig

    def load(self, cfg: GroupingTaskConfig, image_size: int) -> Any:
        return load_grouping_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: GroupingTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_grouping(ctx, cfg, data)

    def modifiers(self, cfg: GroupingTaskConfig) -> list[str]:
        return [f"{cfg.image_size}px" if cfg.image_size else ""]


register_task(GroupingTask())
