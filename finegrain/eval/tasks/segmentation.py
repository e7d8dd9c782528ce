"""Zero-shot segmentation as a task object: data from
``finegrain.eval.datasets.load_segmentation_data``, mIoU from ``evaluate_segmentation``,
overlays from ``finegrain.eval.plots.segmentation_plots``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finegrain.eval.config import SegmentationTaskConfig
from finegrain.eval.datasets import load_segmentation_data
from finegrain.eval.segmentation import evaluate_segmentation
from finegrain.eval.task import EvalTask, register_task


class SegmentationTask(EvalTask):
    name, Config = "segmentation", SegmentationTaskConfig

    def load(self, cfg: SegmentationTaskConfig, image_size: int) -> Any:
        return load_segmentation_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: SegmentationTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_segmentation(ctx, cfg, data)

    def plots(self, ctx: Any, data: Any, art: dict, out_dir: Path, num: int) -> list[Path]:
        from finegrain.eval.plots import segmentation_plots  # matplotlib: only for plots

        return segmentation_plots(ctx, data, art, out_dir, num)

    def modifiers(self, cfg: SegmentationTaskConfig) -> list[str]:
        return [
            "bg" if cfg.background else "",
            f"{cfg.image_size}px" if cfg.image_size else "",
            cfg.dense_variant if cfg.dense_variant != "raw" else "",
            f"slide{cfg.slide_size}" if cfg.slide_size else "",
            cfg.dense_block if cfg.dense_block != "released" else "",
            f"sigma{cfg.gaussian_std:g}" if cfg.gaussian_std != 5.0 else "",
        ]


register_task(SegmentationTask())
