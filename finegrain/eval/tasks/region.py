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

    def leading_modifiers(self, cfg: RegionTaskConfig) -> list[str]:
        return ["desc" if cfg.descriptions else ""]

    def modifiers(self, cfg: RegionTaskConfig) -> list[str]:
        return [
            f"{cfg.image_size}px" if cfg.image_size else "",
            cfg.mode,  # always named: crop | roialign | regions
            "released" if cfg.region_scoring != "iou" else "",
            f"margin{cfg.margin:g}" if cfg.margin else "",
        ]

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Each ground-truth box right (top-1) or not, with its image."""
        right = (art["top"][:, 0] == art["labels"]).double()
        return {"acc1": (right, art["image_index"].long())}


register_task(RegionTask())
