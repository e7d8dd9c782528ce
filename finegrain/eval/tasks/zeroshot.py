"""Zero-shot classification (class names, descriptions, GRAIN's region fusion) as a task
object: data from ``finegrain.eval.datasets.load_classification_data``, scores from
``evaluate_zeroshot``, top-1 per image; no figures."""

from __future__ import annotations

from typing import Any

import torch

from finegrain.eval.config import ZeroShotTaskConfig
from finegrain.eval.datasets import load_classification_data
from finegrain.eval.task import EvalTask, register_task
from finegrain.eval.zeroshot import evaluate_zeroshot


class ZeroShotTask(EvalTask):
    name, Config = "zeroshot", ZeroShotTaskConfig

    def load(self, cfg: ZeroShotTaskConfig, image_size: int) -> Any:
        return load_classification_data(cfg, image_size)

    def evaluate(self, ctx: Any, cfg: ZeroShotTaskConfig, data: Any) -> tuple[dict, dict]:
        return evaluate_zeroshot(ctx, cfg, data)

    def leading_modifiers(self, cfg: ZeroShotTaskConfig) -> list[str]:
        return [
            cfg.scoring if cfg.scoring != "global" else "",
            "desc" if cfg.descriptions else "",
            f"alpha{cfg.fusion_alpha:g}" if cfg.fusion_alpha < 1 else "",
        ]

    def modifiers(self, cfg: ZeroShotTaskConfig) -> list[str]:
        return ["stretch" if cfg.truncate == "stretch" else ""]

    def per_image_values(self, data: Any, art: dict, metrics: dict) -> dict[str, Any]:
        """Top-1: each image right or not."""
        correct = (art["logits"].argmax(1) == art["labels"]).double()
        return {"acc1": (correct, torch.arange(len(correct)))}


register_task(ZeroShotTask())
