"""Zero-shot classification (class names, descriptions, GRAIN's region fusion) as a task
object: data from ``finegrain.eval.datasets.load_classification_data``, scores from
``evaluate_zeroshot``; no figures."""

from __future__ import annotations

from typing import Any

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


register_task(ZeroShotTask())
