"""Region classification (crops, RoIAlign or GRAIN's region queries) as a task object: boxes
per image from ``finegrain.eval.region_data.load_region_data``, scores from ``evaluate_regions``."""

from __future__ import annotations

from typing import Any

from finegrain.eval.config import RegionTaskConfig
from finegrain.eval.region_data import load_region_data
from finegrain.eval.regions import evaluate_regions
from finegrain.eval.task import EvalTask, register_task


class RegionTask(EvalTask):
    name, Config = "region", RegionTaskConfig

    def load(self, cfg: RegionTaskConfig, image_size: int) -> Any:
        return load_region_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: RegionTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_regions(ctx, cfg, data)


register_task(RegionTask())
